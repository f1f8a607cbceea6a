"""Launching our Triton kernels, or only compiling them: how a bucket's Triton tactics are all
compiled at once, in parallel, before any is timed.

Every Triton launch in ``kernels/`` goes through ``launch``. Inside ``compile_only()`` (a thread's
own setting) it compiles the kernel for those arguments (``JITFunction.warmup``) and launches
nothing. ``precompile`` runs a runner's ``forward`` once per tactic in a thread pool, that way:
Triton's slow stages (LLVM, ptxas) run outside the GIL, so a cold bucket costs about one compile
plus its timings, not the sum of all its compiles (Inductor compiles its autotuning choices in a
pool for the same reason). ``FLASHTUNE_COMPILE_THREADS`` sets the pool's size (1: no pool).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger("flashtune")
_local = threading.local()


def _interpreter_index_fix() -> None:
    """Triton < 3.7's interpreter reads a scalar (a ``range`` bound, say) with ``int(array)`` of a
    1-element 1-D array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"); Triton 3.7 squeezes the array first. Do the same on older Tritons, so our
    kernels run under ``TRITON_INTERPRET=1`` (the CPU tests) with Triton 3.6 too."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton
    from triton.runtime import interpreter

    major_minor = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if major_minor >= (3, 7) or patch is None or getattr(patch, "flashtune_fix", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.flashtune_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()


@contextlib.contextmanager
def compile_only() -> Iterator[None]:
    """Inside, ``launch`` compiles its kernel and launches nothing (this thread only)."""
    old = getattr(_local, "compile_only", False)
    _local.compile_only = True
    try:
        yield
    finally:
        _local.compile_only = old


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``; inside ``compile_only()``, only its compilation.

    On a GPU, a launch whose arguments specialize as an earlier one's did (same dtypes, pointer
    alignment, int widths and divisibility, constexprs and options) goes straight to the compiled
    kernel's launcher (``BoundLaunch``), not through Triton's Python launcher."""
    if getattr(_local, "compile_only", False):
        kernel.warmup(*args, grid=grid, **kwargs)
        return
    if not _BIND:  # FLASHTUNE_BOUND_LAUNCH=0
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, _specialization(args), *kwargs.values())
    bound = _bound.get(key)
    if bound is None:
        bound = _bind(key, kernel, grid, args, kwargs)
    try:
        bound(grid, args)
    except (TypeError, ValueError) as e:  # the launcher refused the arguments: nothing was launched
        if type(bound) is not BoundLaunch:
            raise
        log.warning("flashtune: Triton kernel %s launches through Triton's own launcher (%s)", kernel, e)
        _bound[key] = _Unbound(kernel, kwargs)
        kernel[grid](*args, **kwargs)


_BIND = os.environ.get("FLASHTUNE_BOUND_LAUNCH", "1") != "0"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # no compiled kernel to bind: the interpreter's run
_bound: dict[tuple, Any] = {}
_bound_lock = threading.Lock()
MAX_BOUND = 4096  # entries; past it the table is emptied (a model has far fewer specializations)


def _specialization(args: Sequence[Any]) -> tuple:
    """What Triton specializes a launch's compiled kernel on, per positional argument: a tensor's
    dtype, 16-byte alignment and device, an int's 32- or 64-bit width, divisibility by 16 and whether
    it is 1 (a constant to Triton), a float's
    type (not its value), a tensor descriptor's dtype and block shape; anything else (None, bools)
    by value."""
    out = []
    for a in args:
        t = type(a)
        if t is int:
            out.append((a == 1, not a & 15, -0x80000000 <= a <= 0x7FFFFFFF))
        elif t is float:
            out.append(float)
        elif isinstance(a, torch.Tensor):
            out.append((a.dtype, not a.data_ptr() & 15, a.get_device()))
        elif hasattr(a, "block_shape"):  # a host TMA descriptor: its type and block, not its sizes
            out.append((a.base.dtype, tuple(a.block_shape), getattr(a, "padding", None), a.base.get_device()))
        else:
            out.append(a)
    return tuple(out)


def _bind(key: tuple, kernel: Any, grid: tuple[int, ...], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The launcher for ``key``: a ``BoundLaunch`` of the kernel compiled for these arguments, or,
    under the interpreter or where Triton's objects lack what it needs, Triton's own launch
    (``_Unbound``)."""
    bound: Any = None
    if _INTERPRET:
        bound = _Unbound(kernel, kwargs)
    else:
        try:
            _runtime()
            bound = BoundLaunch(kernel.warmup(*args, grid=grid, **kwargs), kernel, args, kwargs)
        except (AttributeError, TypeError, KeyError) as e:  # another Triton's layout: launch as Triton does
            log.info("flashtune: Triton kernel %s launches through Triton's own launcher (%s)", kernel, e)
            bound = _Unbound(kernel, kwargs)
    with _bound_lock:
        if len(_bound) >= MAX_BOUND:
            _bound.clear()
        _bound[key] = bound
    return bound


class BoundLaunch:
    """One compiled Triton kernel, launched as Triton's ``JITFunction.run`` would launch it once it
    has found that kernel: ``compiled.run(grid, stream, function, metadata, hooks, *args)``, with
    the constexpr arguments (fixed by the specialization) appended. Per call: one stream query
    (the current stream, so CUDA graph capture sees the launch) and the launcher itself."""

    __slots__ = ("compiled", "run", "function", "packed", "tail", "device")

    def __init__(self, compiled: Any, kernel: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        names = list(kernel.arg_names)  # kwargs beyond them are options: num_warps, num_stages
        missing = [n for n in names[len(args) :] if n not in kwargs]
        if missing:  # a default the launcher would need: leave such kernels to Triton
            raise KeyError(f"arguments without a value: {missing}")
        compiled[1, 1, 1]  # loads the module and function (CompiledKernel._init_handles)
        self.compiled = compiled
        self.run, self.function, self.packed = compiled.run, compiled.function, compiled.packed_metadata
        self.tail = tuple(kwargs[n] for n in names[len(args) :])  # the constexprs, in order
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        self.device = torch.cuda.current_device() if device is None or device.index is None else device.index

    def __call__(self, grid: tuple[int, ...], args: Sequence[Any]) -> None:
        hooks = _knobs.launch_enter_hook, _knobs.launch_exit_hook
        stream = _raw_stream(self.device)
        g = (*grid, 1, 1)
        if hooks[0] is None and hooks[1] is None:
            self.run(g[0], g[1], g[2], stream, self.function, self.packed, None, None, None, *args, *self.tail)
        else:  # a profiler's hooks: Triton's own per-launch metadata
            self.compiled[g[:3]](*args, *self.tail, stream=stream)


_knobs: Any = None  # triton.knobs.runtime: the launch hooks a profiler may set
_raw_stream: Any = None  # torch's current raw CUDA stream of a device index


def _runtime() -> None:
    """Import what ``BoundLaunch`` calls per launch (once; AttributeError on a Triton without knobs)."""
    global _knobs, _raw_stream
    if _knobs is None:
        import triton

        _raw_stream = torch._C._cuda_getCurrentRawStream
        _knobs = triton.knobs.runtime


class _Unbound:
    """Triton's own launch, for kernels ``BoundLaunch`` cannot bind."""

    __slots__ = ("kernel", "kwargs")

    def __init__(self, kernel: Any, kwargs: dict[str, Any]) -> None:
        self.kernel, self.kwargs = kernel, kwargs

    def __call__(self, grid: tuple[int, ...], args: Sequence[Any]) -> None:
        self.kernel[grid](*args, **self.kwargs)


def bound_launchers() -> dict[tuple, Any]:
    """The bound launchers made so far, by specialization key (for tests and the GPU suite)."""
    return dict(_bound)


def compile_threads() -> int:
    """The pool size for ``precompile``: $FLASHTUNE_COMPILE_THREADS, else min(8, CPUs)."""
    value = os.environ.get("FLASHTUNE_COMPILE_THREADS")
    if not value:
        return min(8, os.cpu_count() or 1)
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FLASHTUNE_COMPILE_THREADS must be a positive int, got {value!r}")
    return int(value)


def precompile(forward: Callable[[Sequence[Any], Any], Any], inputs: Sequence[Any], tactics: Sequence[Any]) -> None:
    """Compile every Triton kernel ``forward(inputs, t)`` launches, for each of ``tactics``, in a
    thread pool; launches nothing. The first error is raised once all are done."""
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)

    def build(tactic: Any) -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # a new thread starts on device 0
        with compile_only():
            forward(inputs, tactic)

    workers = min(compile_threads(), len(tactics))
    if workers <= 1:
        for t in tactics:
            build(t)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="flashtune-compile") as pool:
        for future in [pool.submit(build, t) for t in tactics]:
            future.result()
