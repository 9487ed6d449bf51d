"""KV page transfer micro-benchmark: two processes on one host, one request's pages at a time.

    python -m bench.kv_transfer                      # CPU: both backends, both pool layouts
    python -m bench.kv_transfer --device cuda        # both pools in VRAM of GPU 0 (NIXL: CUDA IPC)

Default request: 4096 tokens in 16-token pages (256 pages) of a GLM-4.7 TP8 shard (92 layers, 1 KV head of 128,
FP8): 96 MiB. Per (backend, layout): setup time (agent + peer + prepared lists), then per pattern (scattered
pages on both sides, one contiguous run, one page) the median over --repeats of post -> DONE on the initiator
and post -> notification seen by the target, and the bandwidth; bytes are verified once per pattern. "post ms" is
the time inside write() (NIXL over TCP/CMA may run the whole transfer in the post: call it from a transfer
thread, not from the scheduler loop).

Measured (4096 tokens = 256 pages, 92 layers x 1 KV head x 128, FP8 = 92 MiB; medians; post -> notification):
  CPU, 2 cores, tcp+cma (commit 0e25909): NIXL page-major scattered 23-33 ms (256 descriptors), contiguous 17 ms
    (1), one page 0.3 ms; NIXL per-layer scattered 255-384 ms (47,104 descriptors), one page 2.2 ms (184);
    local page-major scattered 120-210 ms, per-layer 175-366 ms.
  H200, both pools in VRAM of one GPU, CUDA IPC (UCX_CUDA_IPC_ENABLE_GET_ZCOPY=yes, commit 6f064a1): NIXL
    page-major scattered 3.6 ms (26.7 GB/s; post 3.3 ms), contiguous 1.1 ms (88 GB/s), one page 0.8 ms;
    NIXL per-layer failed (UCX cuda_ipc: cuMemcpyDtoDAsync invalid argument; 1 MiB per-layer tensors that
    the caching allocator packs into shared segments, probably); local page-major scattered 112 ms.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from disagg.kv_layout import KVPageRegions
from disagg.peer_process import LAYOUTS, PeerProcess, PoolSpec, fill, page_bytes_of, wait_done
from disagg.transfer import available_backends, create_transfer_agent


def _descriptors(src: np.ndarray, dst: np.ndarray, regions: int) -> int:
    """Descriptors after merging: one per region and run of pages adjacent on both sides."""
    if src.size == 0:
        return 0
    breaks = 1 + int(np.count_nonzero((np.diff(src) != 1) | (np.diff(dst) != 1)))
    return breaks * regions


def _patterns(n: int, pool: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "scattered": (rng.permutation(pool)[:n], rng.permutation(pool)[:n]),
        "contiguous": (np.arange(n), np.arange(pool - n, pool)),
        "one page": (rng.permutation(pool)[:1], rng.permutation(pool)[:1]),
    }


def run_case(backend: str, spec: PoolSpec, pages: int, repeats: int, options: dict, env: dict) -> list[dict]:
    t0 = time.perf_counter()
    peer = PeerProcess(backend, f"bench-peer-{backend}-{spec.layout}", spec, env=env, options=options)
    spawn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    regions = KVPageRegions.from_kv_caches(spec.allocate())
    fill(regions, seed=3)
    agent = create_transfer_agent(backend, f"bench-main-{backend}-{spec.layout}", regions, **options)
    name = agent.add_peer(peer.metadata)
    setup_s = time.perf_counter() - t0
    rows = []
    try:
        cpu0 = peer.call("cpu_seconds")
        time.sleep(1.0)
        idle_core = peer.call("cpu_seconds") - cpu0
        assert wait_done([agent.write(name, [0], [0], b"warm", 30)], 60)[0].done
        peer.call("notifications", 1, 10)
        rng = np.random.default_rng(0)
        for pattern, (src, dst) in _patterns(pages, spec.num_pages, rng).items():
            post_s, done_s, notif_s = [], [], []
            for i in range(repeats):
                peer.send("notifications", 1, 60)
                t0 = time.perf_counter()
                h = agent.write(name, src, dst, f"r{i}".encode(), timeout_s=60)
                post_s.append(time.perf_counter() - t0)
                st = wait_done([h], 90)[0]
                t_done = time.perf_counter()
                notes = peer.reply("notifications", 90)
                if not st.done or not notes:
                    raise RuntimeError(f"{backend}/{spec.layout}/{pattern}: {st} notifications={notes}")
                done_s.append(t_done - t0)
                notif_s.append(notes[0][2] - t0)
                if i == 0 and peer.call("pages", dst.tolist()) != page_bytes_of(regions, src.tolist()):
                    raise RuntimeError(f"{backend}/{spec.layout}/{pattern}: bytes differ")
            nbytes = src.size * spec.page_bytes
            rows.append({
                "backend": backend, "layout": spec.layout, "pattern": pattern, "pages": int(src.size),
                "descriptors": _descriptors(src, dst, len(regions.regions)), "MiB": nbytes / 2**20,
                "post_ms": 1e3 * statistics.median(post_s), "done_ms": 1e3 * statistics.median(done_s), "notif_ms": 1e3 * statistics.median(notif_s),
                "GB/s": nbytes / statistics.median(notif_s) / 1e9, "setup_s": setup_s, "spawn_s": spawn_s,
                "idle_peer_core": idle_core,
            })
    finally:
        agent.close()
        peer.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=",".join(available_backends()))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=92)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="float8_e4m3fn", choices=["float8_e4m3fn", "bfloat16"])
    ap.add_argument("--pool-pages", type=int, default=0, help="pages per pool (default: 2x the request)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--progress-delay-us", type=int, default=None, help="NIXL progress thread delay")
    ap.add_argument("--json", default="", help="also write the rows here")
    a = ap.parse_args()

    env = {"UCX_NET_DEVICES": os.environ.get("UCX_NET_DEVICES", "lo")}
    if a.device.startswith("cuda"):  # one GPU, no NVLink: UCX would emulate CUDA-IPC reads over TCP otherwise
        env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] = os.environ.get("UCX_CUDA_IPC_ENABLE_GET_ZCOPY", "yes")
    os.environ.update(env)
    torch.set_num_threads(1)
    pages = -(-a.tokens // a.block_size)
    rows = []
    for backend in a.backends.split(","):
        options = {"progress_delay_us": a.progress_delay_us} if backend == "nixl" and a.progress_delay_us else {}
        for layout in a.layouts.split(","):
            spec = PoolSpec(layout=layout, num_layers=a.layers, num_pages=a.pool_pages or 2 * pages,
                            block_size=a.block_size, kv_heads=a.kv_heads, head_dim=a.head_dim, dtype=a.dtype,
                            device=a.device)
            try:
                rows += run_case(backend, spec, pages, a.repeats, options, env)
            except Exception as e:  # noqa: BLE001 - report any failure, keep measuring the other cases
                print(f"# {backend}/{layout}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            r = rows[-1]
            print(f"# {backend}/{layout}: setup {r['setup_s']:.2f} s (agent, pool registration, peer and its "
                  f"prepared list), idle peer {r['idle_peer_core']:.2f} core", flush=True)
    print(f"\nrequest: {a.tokens} tokens, {a.block_size}-token pages, {a.layers} layers x {a.kv_heads} KV head x "
          f"{a.head_dim} {a.dtype}, device {a.device}; median of {a.repeats}")
    print(f"{'backend':8} {'layout':11} {'pattern':11} {'pages':>5} {'descs':>6} {'MiB':>7} "
          f"{'post ms':>8} {'done ms':>9} {'notif ms':>9} {'GB/s':>7}")
    for r in rows:
        print(f"{r['backend']:8} {r['layout']:11} {r['pattern']:11} {r['pages']:5d} {r['descriptors']:6d} "
              f"{r['MiB']:7.2f} {r['post_ms']:8.3f} {r['done_ms']:9.3f} {r['notif_ms']:9.3f} {r['GB/s']:7.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
