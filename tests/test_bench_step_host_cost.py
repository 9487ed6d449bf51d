"""bench/step_host_cost.py runs on the CPU and checks, before timing, that the list path and the array path build
the same table."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_host_cost_smoke():
    proc = subprocess.run([sys.executable, "-m", "bench.step_host_cost", "--batch", "3", "--contexts", "1,40,1000",
                           "--reps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "40", "1000"]
    assert [int(r[1]) for r in rows] == [3 * -(-(c + 1) // 16) for c in (1, 40, 1000)]  # pages of 3 requests


def test_step_host_cost_engine_mode_smoke():
    proc = subprocess.run([sys.executable, "-m", "bench.step_host_cost", "--engine", "--batch", "2", "--contexts",
                           "40"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("engine step"))
    assert "2 requests decoding at 40 tokens" in line and "(TP1)" in line and "(TP:" in line
