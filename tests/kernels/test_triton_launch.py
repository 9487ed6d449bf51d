"""The direct kernel launch (kernels/triton_launch.py): its specialization key separates every class of argument
Triton compiles separately, and on a GPU the cached launch runs the kernel Triton itself would select, with the
same results, across pointer alignments, int classes, constexprs, options and CUDA-graph capture."""
import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

import kernels.triton_launch as tlaunch
from kernels.triton_launch import arg_class, launch


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, stride, alpha, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i * stride, mask=m)
    y = tl.load(y_ptr + i, mask=m)
    tl.store(out_ptr + i, x * alpha * SCALE + y, mask=m)


def test_arg_class_separates_what_triton_specializes():
    base = torch.zeros(64, dtype=torch.float32)
    assert arg_class(base, False) == arg_class(torch.zeros(32, dtype=torch.float32), False)
    assert arg_class(base, False) != arg_class(base[1:], False)  # 4-byte offset: not 16-byte aligned
    assert arg_class(base, False) != arg_class(base.to(torch.bfloat16), False)
    assert arg_class(32, False) == arg_class(4096, False)  # both divisible by 16, 32-bit
    classes = [arg_class(v, False) for v in (1, 16, 17, 2**31, 2**63)]
    assert len(set(classes)) == len(classes)
    assert arg_class(17, False) == arg_class(33, False) == arg_class(-1, False)
    assert arg_class(True, False) != arg_class(False, False) != arg_class(0, False)
    assert arg_class(17, True) != arg_class(33, True)  # a constexpr: its exact value
    assert arg_class(0.5, False) == arg_class(2.0, False)
    d1 = TensorDescriptor.from_tensor(torch.zeros(256, 128, dtype=torch.bfloat16), [64, 64])
    d2 = TensorDescriptor.from_tensor(torch.zeros(512, 128, dtype=torch.bfloat16), [64, 64])
    d3 = TensorDescriptor.from_tensor(torch.zeros(256, 128, dtype=torch.bfloat16), [128, 64])
    d4 = TensorDescriptor.from_tensor(torch.zeros(250, 128, dtype=torch.bfloat16), [64, 64])
    assert arg_class(d1, False) == arg_class(d2, False)
    assert arg_class(d1, False) != arg_class(d3, False)
    assert arg_class(d1, False) != arg_class(d4, False)
    assert arg_class(object(), False) is tlaunch._UNKNOWN


def test_launcher_key_orders_params_and_options():
    # a JITFunction of the kernel's Python source (the interpreter's wrapper has no parameter table)
    runner = tlaunch._KernelLauncher(JITFunction(_axpy_kernel.fn))
    x = torch.zeros(64)
    args = (x, x, x, 64, 1, 0.5)
    vals = runner.values(args, dict(SCALE=2, BLOCK=128, num_warps=4))
    assert vals == [x, x, x, 64, 1, 0.5, 2, 128]
    assert runner.values(args, dict(SCALE=2)) is None  # BLOCK missing: Triton's path reports it
    key = runner.key(0, vals, dict(SCALE=2, BLOCK=128, num_warps=4))
    assert key == runner.key(0, [x, x, x, 4096, 1, 2.0, 2, 128], dict(BLOCK=128, num_warps=4, SCALE=2))
    assert key != runner.key(0, [x, x, x, 64, 1, 0.5, 3, 128], dict(SCALE=3, BLOCK=128, num_warps=4))
    assert key != runner.key(0, vals, dict(SCALE=2, BLOCK=128, num_warps=8))
    assert key != runner.key(1, vals, dict(SCALE=2, BLOCK=128, num_warps=4))  # another device
    assert key != runner.key(0, [x, x, x[1:], 64, 1, 0.5, 2, 128], dict(SCALE=2, BLOCK=128, num_warps=4))
    assert runner.key(0, vals, dict(SCALE=2, BLOCK=128, extern_libs={"a": "b"})) is None  # unhashable option
    assert runner.key(0, [x, x, object(), 64, 1, 0.5, 2, 128], {}) is None


def _run(n, stride, alpha, scale, dtype, device, offset=0, num_warps=4):
    x = torch.randn(n * stride + offset, device=device, dtype=dtype)[offset:]
    y = torch.randn(n, device=device, dtype=dtype)
    out = torch.empty(n, device=device, dtype=dtype)
    launch(_axpy_kernel, (triton.cdiv(n, 128),), x, y, out, n, stride, alpha, SCALE=scale, BLOCK=128,
           num_warps=num_warps)
    ref = (x[::stride][:n].float() * alpha * scale + y.float()).to(dtype)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_launch_on_any_device(device, monkeypatch):
    # under the interpreter (CPU) this is Triton's own launch; on a GPU the direct path after the first call
    monkeypatch.setattr(tlaunch, "_ENABLED", True)
    for _ in range(3):
        _run(1000, 1, 0.5, 2, torch.float32, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_direct_launch_matches_triton_selection(monkeypatch):
    monkeypatch.setattr(tlaunch, "_ENABLED", True)
    monkeypatch.setattr(tlaunch, "_CHECK", True)  # every direct launch also asks Triton which kernel it selects
    dev = torch.device("cuda")
    cases = [
        dict(n=1000, stride=1, alpha=0.5, scale=2, dtype=torch.float32),
        dict(n=1024, stride=1, alpha=0.5, scale=2, dtype=torch.float32),  # n divisible by 16
        dict(n=1000, stride=1, alpha=0.5, scale=2, dtype=torch.float32, offset=1),  # x not 16-byte aligned
        dict(n=1000, stride=3, alpha=0.5, scale=2, dtype=torch.float32),
        dict(n=1000, stride=16, alpha=1.5, scale=2, dtype=torch.float32),
        dict(n=1000, stride=1, alpha=0.5, scale=3, dtype=torch.float32),  # another constexpr value
        dict(n=1000, stride=1, alpha=0.5, scale=2, dtype=torch.bfloat16),
        dict(n=1000, stride=1, alpha=0.5, scale=2, dtype=torch.float32, num_warps=8),  # another option
        dict(n=1, stride=1, alpha=0.5, scale=2, dtype=torch.float32),
    ]
    for _ in range(3):  # the first round fills the cache through Triton; the next ones launch directly
        for c in cases:
            _run(device=dev, **c)
    runner = tlaunch._LAUNCHERS[_axpy_kernel]
    assert len(runner.cache) >= len(cases) - 1  # n=1000 / stride=1 cases share classes only where equal
    # CUDA-graph capture and replay through the direct path
    x = torch.randn(4096, device=dev)
    y = torch.randn(4096, device=dev)
    out = torch.zeros(4096, device=dev)
    args = (x, y, out, 4096, 1, 2.0)
    launch(_axpy_kernel, (32,), *args, SCALE=1, BLOCK=128)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(_axpy_kernel, (32,), *args, SCALE=1, BLOCK=128)
    out.zero_()
    x.copy_(torch.randn(4096, device=dev))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, x * 2.0 + y)


def test_launch_hooks_count_only_when_set():
    # this Triton's hook containers: an empty chain is "no hook", not a hook
    assert not tlaunch._hooked(None)
    assert not tlaunch._hooked(knobs.runtime.launch_enter_hook) or knobs.runtime.launch_enter_hook.calls
    chain = type(knobs.runtime.launch_enter_hook)()
    assert not tlaunch._hooked(chain)
    chain.add(print)
    assert tlaunch._hooked(chain)
