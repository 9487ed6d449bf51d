"""A script that starts tensor parallelism at module level, WITHOUT an `if __name__ == "__main__":` guard (what
tests/test_tp_spawn_guard.py expects to fail fast with a message saying to add one)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine import LLM  # noqa: E402

llm = LLM(sys.argv[1], device="cpu", tensor_parallel_size=2)
print("UNREACHABLE: the engine started")
