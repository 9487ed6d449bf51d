import pytest
import torch

from kernels.moe_routing import moe_route_ref
from kernels.triton_moe_routing import moe_route
from kernel_helpers import poisoned_empty


def _check(w, ids, wr, idr):
    assert w.shape == wr.shape and ids.shape == idr.shape and ids.dtype == torch.int32
    assert not torch.isnan(w).any()
    si, oi = ids.sort(dim=1)
    sr, orr = idr.sort(dim=1)
    assert torch.equal(si, sr)
    torch.testing.assert_close(w.gather(1, oi), wr.gather(1, orr), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "t,e,k,ng,tg,shared",
    [(1, 16, 4, 1, 1, 0), (7, 160, 8, 1, 1, 1), (5, 64, 6, 8, 3, 0), (33, 20, 2, 4, 2, 1), (3, 24, 3, 1, 1, 0)],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("renorm", [True, False])
def test_moe_route(device, t, e, k, ng, tg, shared, bias, renorm):
    logits = torch.randn(t, e, device=device) * 2
    b = torch.randn(e, device=device) * 0.5 if bias else None
    with poisoned_empty():
        w, ids = moe_route(logits, b, k, ng, tg, renorm, 2.5, shared)
    wr, idr = moe_route_ref(logits, b, k, ng, tg, renorm, 2.5, shared)
    _check(w, ids, wr, idr)
    if shared:
        assert (ids[:, -1] == e).all() and (w[:, -1] == 1.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64, 4096])
@pytest.mark.parametrize("shared", [0, 1])
def test_moe_route_gpu(t, shared):
    logits = torch.randn(t, 160, device="cuda") * 2
    b = torch.randn(160, device="cuda") * 0.1
    with poisoned_empty():
        w, ids = moe_route(logits, b, 8, 1, 1, True, 2.5, shared)
    wr, idr = moe_route_ref(logits, b, 8, 1, 1, True, 2.5, shared)
    _check(w, ids, wr, idr)
