"""The buffers behind the tensor-parallel one-shot all-reduce (kernels/triton_allreduce.py): one allocation per
rank that every rank of the group can address, holding this rank's data buffer and its barrier flags. Built
once per TP group, before CUDA graphs are captured; the kernel's address tables never change after, so captured
graphs replay against the same buffers.

On CUDA the allocation is torch's symmetric memory (peer mappings over CUDA IPC / NVLink; multicast stays off).
On CPU ranks running the kernels under the Triton interpreter (TRITON_INTERPRET=1: the tests), it is a file in
/dev/shm that every rank maps, so the whole fused path -- the model's partial sums, the kernel, its barriers
between processes -- runs in CI. Other CPU ranks keep gloo (`available`).

Used for messages of at most `max_bytes` (default MAX_BYTES: decode and small verify steps); larger ones, prefill
chunks, keep NCCL's ring (`TPGroup.fused_reduce`)."""
from __future__ import annotations

import os
import tempfile
import uuid

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

import kernels
from kernels.allreduce import ONE_SHOT_WORLD_SIZES, flag_area_ints

# One-shot reads every rank's copy of the message, so its cost grows with world x size where the ring's stays
# ~2x size: past a few hundred KB the ring wins (vLLM's and SGLang's custom all-reduces switch in that range).
MAX_BYTES = 512 * 1024
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # CPU ranks' shared buffers


def available(device_type: str) -> bool:
    """Where the fused all-reduce can run: CUDA ranks, and CPU ranks under the Triton interpreter."""
    return device_type == "cuda" or (device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


class OneShotAllReduce:
    def __init__(self, group: dist.ProcessGroup, rank: int, world: int, device: torch.device,
                 max_bytes: int = MAX_BYTES) -> None:
        if world not in ONE_SHOT_WORLD_SIZES:
            raise ValueError(f"the fused all-reduce supports tensor-parallel sizes {ONE_SHOT_WORLD_SIZES}, not "
                             f"{world}")
        if not available(device.type):
            raise ValueError(f"the fused all-reduce runs on CUDA devices, not {device.type!r}")
        self.rank = rank
        self.world = world
        self.device = device
        self.max_bytes = max_bytes = -(-max_bytes // 256) * 256  # the flags start 256-byte aligned
        nbytes = max_bytes + 4 * flag_area_ints(world)
        if device.type == "cuda":
            self._buffers = [self._symmetric(group, nbytes)]
            torch.cuda.synchronize(device)
        else:
            self._buffers = self._shared_files(group, nbytes)
        dist.barrier(group=group)  # every rank's flags are zero before any rank signals

    def _symmetric(self, group: dist.ProcessGroup, nbytes: int) -> torch.Tensor:
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # peer loads only (see the device notes)
        buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._handle = symm_mem.rendezvous(buf, group)  # keeps the peers' mappings alive
        buf[self.max_bytes:].zero_()
        offset = buf.data_ptr() - self._handle.buffer_ptrs[self.rank]  # the same on every rank
        self._set_tables([p + offset for p in self._handle.buffer_ptrs])
        return buf

    def _shared_files(self, group: dist.ProcessGroup, nbytes: int) -> list[torch.Tensor]:
        box = [uuid.uuid4().hex if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        paths = [os.path.join(SHM_DIR, f"glint-allreduce-{box[0]}-{r}") for r in range(self.world)]
        with open(paths[self.rank], "wb") as f:
            f.truncate(nbytes)  # zeros
        dist.barrier(group=group)
        bufs = [torch.from_file(p, shared=True, size=nbytes, dtype=torch.uint8) for p in paths]
        dist.barrier(group=group)
        os.unlink(paths[self.rank])  # the mappings stay
        self._set_tables([b.data_ptr() for b in bufs])
        return bufs

    def _set_tables(self, bases: list[int]) -> None:
        self.buffers = torch.tensor(bases, dtype=torch.int64, device=self.device)
        self.flags = self.buffers + self.max_bytes

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x goes through the one-shot kernel; a function of shape and dtype only, so every rank of the
        group decides the same."""
        return (x.device == self.device and x.dim() == 2 and x.shape[0] > 0 and x.is_contiguous()
                and x.dtype in DTYPES and x.numel() * x.element_size() <= self.max_bytes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.one_shot_all_reduce(x, self.buffers, self.flags, self.rank, self.world)

    def all_reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, quant: bool
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        return kernels.one_shot_all_reduce_add_rms_norm(x, self.buffers, self.flags, self.rank, self.world,
                                                        residual.contiguous(), weight, eps, quant)
