"""Run SGLang's own bench_serving.py (from the `sglang` wheel, unmodified) by path: `python run_sglang_bench.py
SGLANG_DIR [bench_serving args]`.

The wheel's benchmark imports two names from `sglang.srt` (FAKE_BOOTSTRAP_HOST from
sglang/srt/disaggregation/utils.py, and sglang/srt/utils/network.py), whose packages import SGLang's GPU runtime
(tvm_ffi, torchvision, a CUDA build of torch) on import; that cannot be installed beside the CPU torch of this
test machine. So those two modules are provided first: network.py loaded from the wheel's own file, and the
disaggregation constant read from the wheel's source. Everything else is the wheel's code.
"""

from __future__ import annotations

import importlib.util
import re
import runpy
import sys
import types
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(root))
    srt = root / "sglang" / "srt"
    spec = importlib.util.spec_from_file_location("sglang.srt.utils.network", srt / "utils" / "network.py")
    network = importlib.util.module_from_spec(spec)
    sys.modules["sglang.srt.utils.network"] = network
    spec.loader.exec_module(network)
    source = (srt / "disaggregation" / "utils.py").read_text()
    host = re.search(r'^FAKE_BOOTSTRAP_HOST = "([^"]+)"', source, re.M)
    disagg = types.ModuleType("sglang.srt.disaggregation.utils")
    disagg.FAKE_BOOTSTRAP_HOST = host.group(1) if host else "2.2.2.2"
    sys.modules["sglang.srt.disaggregation.utils"] = disagg
    script = root / "sglang" / "bench_serving.py"
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
