"""`python -m server` with the test-only scripted engine (tests/server/scripted_engine.py) as the engine
process's core: the LiveServer fixture runs this file instead of `-m server` when GLINT_TEST_SCRIPTS is set."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the engine process imports scripted_engine from here
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import server.app  # noqa: E402
from server.cli import main  # noqa: E402

server.app.EngineClient = functools.partial(server.app.EngineClient, core_factory="scripted_engine:build_scripted_core")

if __name__ == "__main__":
    sys.exit(main())
