"""Turn the fused MoE's QuACK path (config key QUACK, kernels/fused_moe_quack.py) on or off in the launch tables
from a token count on, in place (kernels/configs/fused_moe/*.json): for a whole-prefill A/B on the GPU machine,
and to commit the buckets where `bench.moe_stages --variants quack` measured it faster.

    python -m bench.moe_table --inter 1536,384,192 --quack-from 2049 [--quack '[[128,192,true,1],[128,128,true,1]]']
    python -m bench.moe_table --inter 1536,384,192 --off

A table maps token buckets to configs (the smallest bucket >= T serves T, the largest serves everything above it),
so turning QUACK on from T0 first splits the bucket that serves T0 - 1 and T0 (a copy of it at T0 - 1 keeps the
smaller counts on the Triton kernels), then sets QUACK on every bucket >= T0.
"""
from __future__ import annotations

import argparse
import json

from kernels.triton_moe import config_file


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _serving(buckets: list[int], tokens: int) -> int:
    return next((b for b in buckets if b >= tokens), buckets[-1])


def set_quack(table: dict, from_tokens: int, value: object) -> dict:
    """The table with QUACK = value for every token count >= from_tokens and the old configs below it."""
    out = {k: (dict(v) if not k.startswith("_") else v) for k, v in table.items()}
    buckets = sorted(int(k) for k in out if not k.startswith("_"))
    old = out[str(_serving(buckets, max(1, from_tokens - 1)))]
    if from_tokens > 1 and from_tokens - 1 not in buckets:  # counts below from_tokens keep their config
        out[str(from_tokens - 1)] = {k: v for k, v in old.items() if k != "QUACK"}
    if buckets[-1] < from_tokens:  # a bucket that serves from_tokens and everything above it
        out[str(from_tokens)] = dict(old)
    for k, cfg in out.items():
        if not k.startswith("_") and int(k) >= from_tokens:
            cfg["QUACK"] = value
    meta = {k: v for k, v in out.items() if k.startswith("_")}
    return {**meta, **{k: out[k] for k in sorted((k for k in out if not k.startswith("_")), key=int)}}


def clear_quack(table: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "QUACK"} if not k.startswith("_") else v)
            for k, v in table.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--inter", default="1536,384,192", help="expert widths (the table's N)")
    p.add_argument("--experts", type=int, default=161)
    p.add_argument("--device", default="NVIDIA_H200", help="the table's device name")
    p.add_argument("--quant", default="fp8_channel")
    p.add_argument("--quack-from", type=int, default=None, help="first token count that takes the QuACK path")
    p.add_argument("--quack", default="true", help="the QUACK value: true, or [gate_up tile, down tile] as JSON")
    p.add_argument("--off", action="store_true", help="remove QUACK from every bucket")
    a = p.parse_args(argv)
    if a.off == (a.quack_from is not None):
        p.error("give exactly one of --quack-from and --off")
    value = json.loads(a.quack)
    for n in [int(v) for v in a.inter.split(",")]:
        path = config_file(a.experts, n, a.device, a.quant)
        table = _load(path)
        table = clear_quack(table) if a.off else set_quack(table, a.quack_from, value)
        with open(path, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        on = [k for k, v in table.items() if not k.startswith("_") and "QUACK" in v]
        print(f"{path}: QUACK on buckets {on or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
