"""Profiling inputs for one bucket, made from the real call's inputs.

Guarantees: every dynamic dim is set to the bucket's size and every derived dim to its
constraint's value; each made tensor keeps the real input's dtype, device and dim order (so layout
flags in cache keys agree); integers and bools are drawn from the values the real input holds (so
ids stay in their valid range) unless an initializer says otherwise; inputs whose shape is
unchanged and that have no initializer are reused as they are. Random values come from the
caller's private generators, so tuning never shifts the user's random stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .buckets import TuningConfig

Generators = Callable[[torch.device], torch.Generator]  # device -> a private, seeded generator


def new_generator(device: torch.device) -> torch.Generator:
    """A generator for ``device`` with a fixed seed: profiling inputs never touch the user's stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0x5EED)
    return gen


def bucket_shapes(inputs: Sequence[Any], config: TuningConfig, bucket: tuple[int, ...]) -> list:
    """Every input's shape at this bucket (None for non-tensors)."""
    shapes = [list(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs]
    for spec, size in zip(config.dynamic, bucket):
        for i, d in zip(spec.input_idx, spec.dim_idx):
            shapes[i][d] = size
    for c in config.constraints:
        shapes[c.input_idx][c.dim_idx] = int(c.infer(shapes))
    return [tuple(s) if s is not None else None for s in shapes]


def _empty_like_layout(real: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An uninitialized dense tensor of ``shape`` whose dims are laid out in ``real``'s order."""
    if real.dim() < 2:
        return torch.empty(shape, dtype=real.dtype, device=real.device)
    order = sorted(range(real.dim()), key=lambda d: (-real.stride(d), -d))  # outermost first
    base = torch.empty([shape[d] for d in order], dtype=real.dtype, device=real.device)
    return base.permute([order.index(d) for d in range(real.dim())])


def _random_like(real: torch.Tensor, shape: tuple, generators: Generators) -> torch.Tensor:
    out = _empty_like_layout(real, shape)
    if out.numel() == 0:
        return out
    gen = generators(out.device)
    if out.is_floating_point() or out.is_complex():
        return out.normal_(generator=gen)
    pool = real.reshape(-1)
    if pool.numel() == 0:
        return out.zero_()
    idx = torch.randint(pool.numel(), (out.numel(),), generator=gen, device=out.device)
    out.copy_(pool[idx].view(out.shape))
    return out


def synthesize(
    inputs: Sequence[Any], config: TuningConfig, bucket: tuple[int, ...], generators: Generators = new_generator
) -> tuple[list, tuple, int]:
    """Inputs for profiling ``bucket``: (inputs, shapes, number of tensors made). Random values
    come from ``generators(device)`` (default: a fresh generator with a fixed seed)."""
    shapes = bucket_shapes(inputs, config, bucket)
    out: list = list(inputs)
    made = 0
    for i, (x, shape) in enumerate(zip(inputs, shapes)):
        if not isinstance(x, torch.Tensor):
            continue
        init = config.initializers.get(i)
        if init is not None:
            out[i] = init(shape, x.dtype, x.device)
            if not isinstance(out[i], torch.Tensor) or tuple(out[i].shape) != shape:
                raise ValueError(f"initializer for input {i} must return a tensor of shape {shape}")
        elif tuple(x.shape) != shape:
            out[i] = _random_like(x, shape, generators)
        else:
            continue
        made += 1
    return out, tuple(shapes), made
