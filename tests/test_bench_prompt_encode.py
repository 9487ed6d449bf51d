"""bench/prompt_encode.py runs on the CPU and checks, before printing, that the cached pieces give the whole
prompt's ids for both tokenizers."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_prompt_encode_smoke():
    proc = subprocess.run([sys.executable, "-m", "bench.prompt_encode", "--turns", "3", "--reps", "2", "--vocab", "800",
                           "--corpus-chars", "300000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("tiny", "GLM-like"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.split() for c in row.split("|")]
        assert int(cells[0][-1].replace(",", "")) > 1000  # tokens of the 4-round prompt
        assert all(float(x) >= 0 for c in cells[1:] for x in c)  # encode / batch / cold / next turn, stalls
