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
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

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
    """``kernel[grid](*args, **kwargs)``; inside ``compile_only()``, only its compilation."""
    if getattr(_local, "compile_only", False):
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


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
