"""Hand-written CPU kernels, built on first use for this machine's CPU: ``blocked_gemm.cpp`` (GEMM and
MoE layer on prepacked weights) and ``rows_gemm.cpp`` (GEMM reading the weight as it is).

``load_blocked_gemm()`` compiles the library the first time it is called on a machine, with
``-march=native`` (the vector width and ISA are this CPU's) and OpenMP (torch's intra-op threads),
about 35 s (``extension.built_module``: logged, never hanging on a build another process left). The
linears' warm calls are pybind11 functions of the build (no dispatcher); its other functions are
torch ops in a namespace named after the build.
The build name hashes the sources, flags, torch version and the CPU's feature flags, so a cache
directory shared by different machines never hands one a binary built for another. A machine without a C++
compiler lacks the family: the failure is logged once and the runner offers no tactics.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
import torch.nn.functional as F

from ..extension import BuiltOnce, build_name, built_module, log

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_PATH = os.path.join(_HERE, "blocked_gemm.cpp")  # binds the Python module
SOURCES = (SOURCE_PATH, os.path.join(_HERE, "rows_gemm.cpp"), os.path.join(_HERE, "quant_gemm.cpp"))
HEADERS = (os.path.join(_HERE, "common.h"),)
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
    """The built library: ``linear`` (pybind11) allocates the output and raises the library's
    messages; packing and the MoE layer are ops of ``torch.ops.<build name>``."""

    def __init__(self, extension: Any, module: Any) -> None:
        self.extension = extension  # torch.ops.<build name>
        # linear(x, packed, b, n, mr, r, ksplit=1, pairs=False): ``x @ w.T + b`` (x and b of any
        # strides) from ``packed = pack(w, r, pairs)``, with tiles of ``mr`` rows and ``ksplit``
        # tasks per block along K; RuntimeError naming the bad argument. The warm path's call: a
        # pybind11 function of the build (the output allocated in C++, no dispatcher), not a method.
        self.linear = module.blocked_linear
        # rows_linear(x, w, b, mb, u, pairs=False): ``x @ w.T + b`` reading w [N, K] as it is (unit
        # column stride, any row stride; x and b of any strides), ``mb`` rows of x per pass over a row
        # of w, ``u`` accumulators per row; ``pairs``: bf16 by vdpbf16ps. RuntimeError naming the bad
        # argument. No copy of w is made or needed.
        self.rows_linear = module.rows_linear
        # quant_linear(x, packed, scales, zs, b, n, bits, gs, mr, r, ksplit=1): ``x @ W.T + b`` for
        # W = s * (q - z) per group of ``gs`` along K, from ``pack_quant``'s tensors (quant_gemm.cpp).
        self.quant_linear = module.quant_linear
        # quant_rows_linear(x, q, scales, zeros, b, gs, mb): the same product reading q [N, K] (int8),
        # scales and zeros [N, G] as they are (rows_gemm.cpp), ``mb`` rows of x per pass over a row of
        # q. No copy of the weight is made or needed.
        self.quant_rows_linear = module.quant_rows_linear
        self.quant_rows_heights = tuple(int(v) for v in extension.quant_rows_heights().split())
        self.quant_tiles = tuple(tuple(int(v) for v in t.split("x")) for t in extension.quant_tiles().split())
        self.rows_tiles = tuple(tuple(int(v) for v in t.split("x")) for t in extension.rows_tiles().split())
        self.moe_out = extension.blocked_moe_out.default
        self.vector_width = int(extension.vector_width())  # fp32 lanes per vector register
        self.tiles = tuple(tuple(int(v) for v in t.split("x")) for t in extension.tiles().split())
        self.bf16_pairs = bool(extension.has_bf16_pairs())  # the vdpbf16ps kernel (AVX512_BF16) is built

    def block_width(self, r: int) -> int:
        """Columns per packed block for tiles of ``r`` vectors."""
        return r * self.vector_width

    def pack(self, w: torch.Tensor, r: int, pairs: bool = False) -> torch.Tensor:
        """``w [N, K]`` in blocks of ``block_width(r)`` of its rows, zero-padded, in w's dtype (and
        huge pages where the OS allows); ``pairs``: k interleaved in pairs for the bf16 pairs kernel.
        ``w [E, N, K]``: each expert's so, stacked."""
        with torch.no_grad():
            return self.extension.pack_blocked(w.detach(), self.block_width(r), 2 if pairs else 1)

    def pack_gate_up(self, gate: torch.Tensor, up: torch.Tensor, r: int, pairs: bool = False) -> torch.Tensor:
        """Experts' ``gate`` and ``up`` weights ``[E, I, H]`` packed for ``moe``: block j holds gate
        rows ``j * half ..`` then the same up rows (``half`` = ``block_width(r) // 2``), so one tile
        yields matching gate and up columns; zero rows pad I to a multiple of ``half``."""
        half = self.block_width(r) // 2
        e, inter, hidden = gate.shape
        ipad = -(-inter // half) * half
        with torch.no_grad():
            padded = [F.pad(w.detach(), (0, 0, 0, ipad - inter)).view(e, -1, half, hidden) for w in (gate, up)]
            return self.pack(torch.stack(padded, dim=2).view(e, 2 * ipad, hidden), r, pairs)

    def pack_quant(
        self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, r: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(packed, scales, zs)`` for ``quant_linear`` from ``q [N, K]`` (int8 values; for ``bits``
        4, each in -8..7, two per byte in the pack), ``scales [N, G]`` and ``zeros [N, G]`` or None:
        blocks of ``block_width(r)`` rows of q as ``[blocks, K, width]``, scales and ``zeros *
        scales`` as fp32 ``[blocks, G, width]``, zero-padded past N (quant_gemm.cpp's header). zs is
        empty when there is no zero term. ValueError if int4 values are out of range."""
        nb = self.block_width(r)
        n, k = q.shape
        pad = -(-n // nb) * nb - n
        with torch.no_grad():
            q = q.detach()
            blocks = F.pad(q, (0, 0, 0, pad)).view(-1, nb, k).transpose(1, 2)  # [B, K, nb]
            if bits == 4:
                if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
                    raise ValueError("pack_quant: int4 values must lie in -8..7")
                u = (blocks.to(torch.int16) + 8).to(torch.uint8).reshape(*blocks.shape[:2], r // 2, 2, -1)
                blocks = (u[..., 0, :] | (u[..., 1, :] << 4)).reshape(*blocks.shape[:2], nb // 2)
            packed = self.extension.empty_huge(list(blocks.shape), blocks.dtype).copy_(blocks)

            def per_block(t: torch.Tensor) -> torch.Tensor:
                return F.pad(t.float(), (0, 0, 0, pad)).view(-1, nb, t.shape[1]).transpose(1, 2).contiguous()

            s = scales.detach()
            offset = 8.0 if bits == 4 else 0.0
            if zeros is None and not offset:
                zs = torch.empty(0)
            else:
                z = zeros.detach().float() if zeros is not None else torch.zeros_like(s, dtype=torch.float)
                zs = per_block((z + offset) * s.float())
            return packed, per_block(s), zs

    def moe(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        inter: int,
        activation: int,
        r: int,
        pairs: bool = False,
    ) -> torch.Tensor:
        """One MoE layer (``kernels/moe.py``'s semantics) from ``gate_up = pack_gate_up(w1, w3, r, pairs)``
        and ``down = pack(w2, r, pairs)``: ``x [T, H]`` with unit column stride, ``weights [T, k]``
        fp32 and ``ids [T, k]`` int64, both contiguous; ``activation`` 0 silu, 1 gelu, 2 gelu_tanh.
        RuntimeError naming the bad argument."""
        out = x.new_empty(x.shape)
        error = self.moe_out(x, weights, ids, gate_up, down, out, inter, activation, r, pairs)
        if error:
            raise RuntimeError(error)
        return out


def unpack(packed: torch.Tensor, n: int, k: int, pairs: bool | int) -> torch.Tensor:
    """The weight ``w [n, k]`` that ``BlockedGemm.pack(w, r, pairs)`` packed into ``packed`` (a new
    tensor; pure torch, the library need not be built)."""
    blocks, steps, width = packed.shape
    kps = 2 if pairs else 1
    w = packed.view(blocks, steps, width // kps, kps).permute(0, 2, 1, 3).reshape(blocks * width // kps, steps * kps)
    return w[:n, :k].contiguous()


def library_name() -> str:
    """The build's name: a hash of the sources, flags, torch version and this CPU's features."""
    texts = []
    for path in (*SOURCES, *HEADERS):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    return build_name("flashtune_blocked_gemm", *texts, *EXTRA_CFLAGS, cpu_fingerprint())


def _build() -> BlockedGemm:
    from torch.utils.cpp_extension import load

    name = library_name()

    def compile_into(directory: str) -> Any:
        return load(
            name=name,
            sources=list(SOURCES),
            extra_cflags=[*EXTRA_CFLAGS, f"-DFT_NS={name}"],
            extra_ldflags=["-fopenmp"],
            build_directory=directory,
            is_python_module=True,  # the module's blocked_linear; loading it also fills torch.ops.<name>
            verbose=False,
        )

    module = built_module("CPU kernel library", name, compile_into, about_s=35)
    return BlockedGemm(getattr(torch.ops, name), module)


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
