"""Real-shape calls of every Triton wrapper, used by compile_sm90.py (compile only, CPU tensors)."""
from __future__ import annotations

import traceback

import torch

BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn


def case_quant():
    from kernels.triton_quant import quant_fp8_per_group, quant_fp8_per_token

    for t, k in [(1, 5120), (64, 12288), (4096, 5120)]:
        x = torch.empty(t, k, dtype=BF16)
        quant_fp8_per_token(x)
        quant_fp8_per_group(x)


CASES = {
    "quant": case_quant,
}


def run_cases(names: list[str]) -> list[str]:
    failed = []
    for name, fn in CASES.items():
        if names and name not in names:
            continue
        try:
            fn()
        except Exception:
            traceback.print_exc()
            failed.append(name)
    return failed
