"""Host-to-device copies for the step loop."""
from __future__ import annotations

import torch


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor without stalling the host: a pageable copy would wait for every kernel
    queued on the stream (killing overlap scheduling); a pinned, non-blocking one does not."""
    t = torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
