"""TP without torchrun from a script without an `if __name__ == "__main__":` guard fails within seconds, saying
to add the guard (spawned ranks re-import the main module; rank 0 used to hang in the rendezvous for minutes)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_unguarded_tp_script_fails_fast_with_the_fix(tiny_bf16):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/tp_unguarded.py"), str(tiny_bf16)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0 and "UNREACHABLE" not in proc.stdout, proc.stdout + proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert 'if __name__ == "__main__":' in proc.stderr and "tp_unguarded.py" in proc.stderr, proc.stderr[-3000:]
    assert "exited with code" in proc.stderr  # rank 0 noticed the dead rank instead of waiting in the rendezvous
    assert "DistStoreError" not in proc.stderr
