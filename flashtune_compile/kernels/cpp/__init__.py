"""Hand-written CPU kernels (``blocked_gemm.cpp``), built on first use for this machine's CPU.

``load_blocked_gemm()`` compiles the library the first time it is called, with ``-march=native``
(the vector width and ISA are this CPU's) and OpenMP (torch's intra-op threads), and loads its
functions as torch ops in a namespace named after the build (no pybind: ~12 s to build, not ~33 s).
The build name hashes the sources, flags, torch version and the CPU's feature flags, so a cache
directory shared by different machines never hands one a binary built for another. A machine without a C++
compiler lacks the family: the failure is logged once and the runner offers no tactics.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from ..extension import BuiltOnce, build_name, log

SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blocked_gemm.cpp")
EXTRA_CFLAGS = ("-O3", "-march=native", "-fopenmp")  # IEEE arithmetic: no -ffast-math


def cpu_fingerprint() -> str:
    """What the compiled code depends on besides the sources: machine, CPU feature flags, torch."""
    flags = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), flags)
    except OSError:
        pass
    return f"{platform.machine()} {torch.__version__} {flags}"


class BlockedGemm:
    """The built library (``torch.ops.<build name>``): ``linear`` allocates the output and raises the
    library's messages."""

    def __init__(self, extension: Any) -> None:
        self.extension = extension  # torch.ops.<build name>
        self.linear_out = extension.blocked_linear_out.default  # the warm call: no overload lookup
        self.vector_width = int(extension.vector_width())  # fp32 lanes per vector register
        self.tiles = tuple(tuple(int(v) for v in t.split("x")) for t in extension.tiles().split())
        self.bf16_pairs = bool(extension.has_bf16_pairs())  # the vdpbf16ps kernel (AVX512_BF16) is built

    def block_width(self, r: int) -> int:
        """Columns per packed block for tiles of ``r`` vectors."""
        return r * self.vector_width

    def pack(self, w: torch.Tensor, r: int, pairs: bool = False) -> torch.Tensor:
        """``w [N, K]`` in blocks of ``block_width(r)`` of its rows, zero-padded, in w's dtype (and
        huge pages where the OS allows); ``pairs``: k interleaved in pairs for the bf16 pairs kernel."""
        with torch.no_grad():
            return self.extension.pack_blocked(w.detach(), self.block_width(r), 2 if pairs else 1)

    def linear(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        b: torch.Tensor | None,
        n: int,
        mr: int,
        r: int,
        ksplit: int = 1,
        pairs: bool = False,
    ) -> torch.Tensor:
        """``x @ w.T + b`` from ``packed = pack(w, r, pairs)``, with tiles of ``mr`` rows and
        ``ksplit`` tasks per block along K; RuntimeError naming the bad argument."""
        y = x.new_empty(x.shape[0], n)
        error = self.linear_out(x, packed, b, y, mr, r, ksplit, pairs)
        if error:
            raise RuntimeError(error)
        return y


def _build() -> BlockedGemm:
    from torch.utils.cpp_extension import load

    with open(SOURCE_PATH, encoding="utf-8") as f:
        source = f.read()
    name = build_name("flashtune_blocked_gemm", source, *EXTRA_CFLAGS, cpu_fingerprint())
    log.info("compiling the CPU blocked GEMM kernel for this CPU (once per machine, about 10 s): %s", name)
    load(
        name=name,
        sources=[SOURCE_PATH],
        extra_cflags=[*EXTRA_CFLAGS, f"-DFT_NS={name}"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,  # loaded into torch.ops.<name>
        verbose=False,
    )
    return BlockedGemm(getattr(torch.ops, name))


_built = BuiltOnce("CPU blocked GEMM kernel", _build)


def load_blocked_gemm() -> BlockedGemm:
    """The compiled CPU kernel; built on the first call, at most once per process. RuntimeError
    (the same one on every later call) when it cannot be built here."""
    return _built.get()


def blocked_gemm_or_none() -> BlockedGemm | None:
    """The compiled kernel, or None where it cannot be built (logged once, as a warning)."""
    if _built.failed():
        return None
    try:
        return _built.get()
    except RuntimeError as e:
        log.warning("CPU blocked GEMM kernels are not available on this machine: %s", e)
        return None
