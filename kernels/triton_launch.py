"""Launching a Triton kernel with a fraction of `kernel[grid](...)`'s host time.

An eager prefill forward is ~20 kernel launches per layer, and at the TP8 shard widths a 4,096-token prefill's
kernels take less time than the host needs to launch them (H100, session 31: 15 ms of kernels, 24-32 ms per
forward). Triton's `JITFunction.run` spends ~22 us per launch on the host (binding the arguments, its cache key,
device and stream queries, hooks); calling the compiled kernel's launcher directly takes ~8 us.

`launch(kernel, grid, *args, **kwargs)` does the latter once Triton itself has launched the kernel with
arguments of the same *specialization class*: a key built from what Triton specializes on, made at least as
fine as Triton's (a finer key only means more entries, each filled by Triton's own path):
  tensors            dtype, data pointer 16-byte aligned
  ints (not bool)    == 1, divisible by 16, 32- / 64-bit signed / unsigned 64-bit range
  constexpr params   the value itself
  tensor descriptors base dtype, block shape, padding, base alignment, shape and strides divisible by 16
  floats, None, bool their type (bools: their value)
  options (num_warps, launch_pdl, ...) their values
An argument of any other type, an unhashable constexpr or option, a grid given as a function, an interpreter run,
or a Triton launch hook set (profilers) takes Triton's path.

Off unless `GLINT_FAST_LAUNCH=1` (read at import) until it has passed its GPU tests with the check below on
(written in session 31, when the session's device time ran out before they could run).
`GLINT_LAUNCH_CHECK=1` (GPU tests) also computes Triton's own cache key at every direct launch and raises if
the kernel it selects is not the one cached under this module's key.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import compute_cache_key
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.triton_common import INTERPRET

_ENABLED = os.environ.get("GLINT_FAST_LAUNCH", "0") == "1"
_CHECK = os.environ.get("GLINT_LAUNCH_CHECK", "0") == "1"
_UNKNOWN = object()  # an argument type this module does not key: always Triton's path


def _int_class(v: int) -> tuple:
    rng = 0 if -(1 << 31) <= v < (1 << 31) else 1 if -(1 << 63) <= v < (1 << 63) else 2
    return (int, v == 1, v % 16 == 0, rng)


def _desc_class(d: TensorDescriptor) -> tuple:
    return (TensorDescriptor, d.base.dtype, tuple(d.block_shape), d.padding, d.base.data_ptr() % 16 == 0,
            tuple(s % 16 == 0 for s in d.strides), tuple(s % 16 == 0 for s in d.shape))


def arg_class(v: Any, constexpr: bool) -> Any:
    """The specialization class of one argument (see the module docstring); _UNKNOWN where not keyed."""
    if constexpr:
        return ("constexpr", v)
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool):
        return (bool, v)
    if isinstance(v, int):
        return _int_class(v)
    if isinstance(v, float):
        return (float,)
    if v is None:
        return (None,)
    if isinstance(v, TensorDescriptor):
        return _desc_class(v)
    return _UNKNOWN


def _hooked(hook) -> bool:
    """A launch hook is set: Triton >= 3.6 keeps a HookChain there (never None), set when it holds calls."""
    return hook is not None and bool(getattr(hook, "calls", True))


class _KernelLauncher:
    """The direct-launch cache of one @triton.jit function."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.names = [p.name for p in fn.params]
        self.params = frozenset(self.names)
        self.constexpr = [p.is_constexpr for p in fn.params]
        sig = inspect.signature(fn.fn)
        self.defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        self.cache: dict[tuple, Any] = {}

    def values(self, args: tuple, kwargs: dict) -> list | None:
        """Every parameter's value in order (positional, keyword, default); None where one is missing."""
        vals = list(args)
        for name in self.names[len(args):]:
            if name in kwargs:
                vals.append(kwargs[name])
            elif name in self.defaults:
                vals.append(self.defaults[name])
            else:
                return None
        return vals

    def key(self, device: int, vals: list, kwargs: dict) -> tuple | None:
        parts = [device]
        for v, c in zip(vals, self.constexpr):
            cls = arg_class(v, c)
            if cls is _UNKNOWN:
                return None
            parts.append(cls)
        parts.extend((k, v) for k, v in sorted(kwargs.items()) if k not in self.params)  # launch options
        key = tuple(parts)
        try:
            hash(key)
        except TypeError:  # an unhashable constexpr or option value: Triton's path
            return None
        return key

    def __call__(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        if callable(grid) or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook):
            self.fn[grid](*args, **kwargs)
            return
        device = driver.active.get_current_device()
        vals = self.values(args, kwargs)
        key = self.key(device, vals, kwargs) if vals is not None else None
        kernel = self.cache.get(key) if key is not None else None
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)  # Triton's path: compiles if it must, launches
            if key is not None and kernel is not None:
                self.cache[key] = kernel
            return
        if _CHECK:
            self.check(device, kernel, args, kwargs)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        stream = driver.active.get_current_stream(device)
        kernel.run(grid[0], g1, g2, stream, kernel.function, kernel.packed_metadata, None, None, None, *vals)

    def check(self, device: int, kernel, args: tuple, kwargs: dict) -> None:
        """Triton's own selection for these arguments (its binder and cache key: Triton internals, for tests)."""
        kw = dict(kwargs)
        kw["debug"] = kw.get("debug", self.fn.debug) or knobs.runtime.debug
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # Triton >= 3.7 adds this option in run()
            kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        kernel_cache, key_cache, _, _, binder = self.fn.device_caches[device]
        _, specialization, options = binder(*args, **kw)
        chosen = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
        if chosen is not kernel:
            raise AssertionError(f"{self.fn.__name__}: the direct launch would run a kernel Triton does not select "
                                 f"for these arguments (specialization {specialization})")


_LAUNCHERS: dict[Any, _KernelLauncher] = {}  # per @triton.jit function, like Triton's own kernel cache


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) with less host time on a GPU (same kernel, same arguments)."""
    if INTERPRET or not _ENABLED:
        kernel[grid](*args, **kwargs)
        return
    runner = _LAUNCHERS.get(kernel)
    if runner is None:
        runner = _LAUNCHERS[kernel] = _KernelLauncher(kernel)
    runner(grid, args, kwargs)


__all__ = ["arg_class", "launch"]
