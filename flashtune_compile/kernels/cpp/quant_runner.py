"""The CPU quantized GEMM (``quant_gemm.cpp``) as a tuner candidate for ``linear_wq``.

Inputs are ``linear_wq``'s ``(x [M, K], q [N, K] int8, scales [N, G], zeros [N, G] | None, bias
[N] | None, group_size, bits)`` on CPU (``kernels/quant.py`` says what they mean). The kernel streams
a packed copy of q (int8, or for ``bits`` 4 two values per byte) with the scales and zero points
laid out per block, all three one copy in the tuner's never-stale weight cache, valid while q,
scales and zeros are the same tensors, unchanged. A tactic is ``(mr, r, ksplit)``: tiles of
``mr`` rows of x by ``r`` vector widths of columns, and ``ksplit`` tasks along K per column block.
Every tactic is correct for every M. A tile ``AMX_ROWS`` rows tall, built and offered only where the
CPU has AMX and the OS grants it, sums bf16 x with AMX tiles (an even group size, or one group per
row): with AVX-512's vectors, rows of x cost a weight's worth of multiplies each; with AMX, 16 rows
cost about one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...tuner.autotuner import AutoTuner
from ...tuner.runner import DEFAULT_TACTIC, BucketProfile, Tactic
from ...tuner.weights import WeightCache
from . import blocked_gemm_or_none, load_blocked_gemm
from .bound import BoundRunner
from .runner import MIN_K_FOR_SPLIT

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Up to here the kernel competes: past one row tile it dequantizes each chunk once into an fp32
# scratch and every tile sums from it, an fp32 GEMM on a quarter (int8) of the weight stream.
MAX_M = 256
AMX_ROWS = 16  # the tile height quant_gemm.cpp sums with AMX


def takes(inputs: Sequence[Any]) -> bool:
    """Whether ``linear_wq``'s inputs are ones the CPU quantized kernels compute (CPU, dtypes, ranks,
    scales and zero points shaped per group, bias), any M: the packed kernel here and the rows
    kernel (``rows_runner.py``) alike."""
    x, q, scales, zeros, bias, group_size, bits = inputs
    tensors = [t for t in (x, q, scales, zeros, bias) if t is not None]
    if any(t.device.type != "cpu" for t in tensors) or x.dtype not in DTYPES or q.dtype != torch.int8:
        return False
    if bits not in (4, 8) or group_size < 1 or q.dim() != 2 or scales.dim() != 2 or q.shape[1] != x.shape[1]:
        return False
    if tuple(scales.shape) != (q.shape[0], max(1, -(-q.shape[1] // group_size))) or not scales.is_floating_point():
        return False
    if zeros is not None and (zeros.shape != scales.shape or zeros.is_complex() or zeros.dtype == torch.bool):
        return False
    return bias is None or (bias.dtype == x.dtype and bias.shape == (q.shape[0],))


def applies(inputs: Sequence[Any]) -> bool:
    """Whether the packed kernel takes these inputs: ``takes``, and copies worth keeping (model state)."""
    x, q, scales, zeros, bias, group_size, bits = inputs
    return takes(inputs) and all(WeightCache.cacheable(t) for t in (q, scales, zeros) if t is not None)


def amx_applies(inputs: Sequence[Any]) -> bool:
    """Whether the AMX tile takes these inputs: bf16 x, and groups of an even size or one per row."""
    x, q, scales, zeros, bias, group_size, bits = inputs
    return x.dtype == torch.bfloat16 and (group_size % 2 == 0 or group_size >= q.shape[1])


def quant_tactics(m: int, k: int, tiles: Sequence[tuple[int, int]], amx: bool = True) -> list[tuple[int, int, int]]:
    """The pruned tactic space at a bucket of ``m`` rows, per tile width: heights no taller than
    the next power of two of ``m`` (at least the shortest) and, above 8 rows, that width's two
    tallest; split K (x2) only for m <= 4 and k >= 1024; and from 2 rows, the AMX tile if built
    and ``amx``. Every width keeps tactics at every m, so a weight packed at one width (one copy
    per weight) is served well at every size."""
    cap = 1 << max(0, m - 1).bit_length()
    splits = (1, 2) if m <= 4 and k >= MIN_K_FOR_SPLIT else (1,)
    out = []
    for r in sorted({r for _, r in tiles}):
        heights = sorted(mr for mr, width in tiles if width == r and mr != AMX_ROWS)
        fit = [mr for mr in heights if mr <= cap] or heights[:1]
        out += [(mr, r, s) for mr in (fit[-2:] if m > 8 else fit) for s in splits]
        if amx and m >= 2 and (AMX_ROWS, r) in tiles:
            out.append((AMX_ROWS, r, 1))
    return out


def copy_kind(r: int) -> str:
    """The weight cache's kind for a pack in blocks of ``r`` vectors (a weight's bits never change)."""
    return f"quant{r}"


def _bound(tactic: tuple[int, int, int]) -> Callable[..., torch.Tensor]:
    """``fn(*inputs)`` computing the linear by ``tactic``: the packed copy from the tuner's cache,
    then the kernel (the warm path, so nothing else)."""
    mr, r, ksplit = tactic
    kernel = load_blocked_gemm()
    weights = AutoTuner.get().weights  # the tuner of the calling site
    nb, kind = kernel.block_width(r), copy_kind(r)

    def packer(bits: int) -> Callable[[tuple], tuple]:
        def make(owners: tuple) -> tuple:  # (q, scales) or (q, scales, zeros), as ``get`` was given them
            return kernel.pack_quant(owners[0], owners[1], owners[2] if len(owners) > 2 else None, bits, r)

        return make

    makes = {bits: packer(bits) for bits in (4, 8)}  # made once: the warm call builds no closure

    def fn(x, q, scales, zeros, bias, group_size, bits):
        n, k = q.shape
        blocks = -(-n // nb)
        size = blocks * k * nb * bits // 8 + 2 * blocks * scales.shape[1] * nb * 4
        owners = (q, scales) if zeros is None else (q, scales, zeros)
        packed, sp, zs = weights.get(owners, kind, makes[bits], size)
        return kernel.quant_linear(x, packed, sp, zs, bias, n, bits, group_size, mr, r, ksplit)

    return fn


class CpuQuantLinearRunner(BoundRunner):
    """``x @ W.T + b`` for an integer weight with scales, by the CPU quantized kernel: the weight
    streamed in its own bits, widened in registers, fp32 sums scaled per group, zero points and
    bias in the epilogue. Functional: never writes its inputs."""

    name = "cpu_quant"

    def get_valid_tactics(self, inputs: Sequence[Any], profile: BucketProfile) -> list[Tactic]:
        m, k = int(profile.shapes[0][0]), int(profile.shapes[0][1])
        if m > MAX_M or not applies(inputs):
            return []
        kernel = blocked_gemm_or_none()
        if kernel is None:
            return []
        return quant_tactics(m, k, kernel.quant_tiles, amx_applies(inputs))

    def resolve(self, tactic: Tactic, inputs: Sequence[Any] | None) -> tuple:
        if tactic == DEFAULT_TACTIC:
            return (1, 4, 1) if inputs is not None and inputs[0].shape[0] <= 1 else (4, 4, 1)
        if not isinstance(tactic, (tuple, list)) or len(tactic) != 3:
            raise ValueError(f"cpu_quant tactic must be (mr, r, ksplit) or -1, got {tactic!r}")
        return tuple(int(v) for v in tactic)

    def bind(self, tactic: tuple) -> Callable[..., torch.Tensor]:
        return _bound(tactic)

    def copy_kind(self, tactic: Tactic) -> str | None:
        return copy_kind(self.resolve(tactic, None)[1] if tactic != DEFAULT_TACTIC else 4)
