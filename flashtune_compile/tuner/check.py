"""Is a candidate's output the same function as the default's? One verdict per candidate."""

from __future__ import annotations

from typing import Any

import torch

# Largest error allowed, relative to the reference's largest magnitude. float32 admits TF32.
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def mismatch(out: Any, ref: Any, rtol: float | None = None) -> str | None:
    """None if ``out`` matches ``ref`` (same structure, shapes and dtypes; values within the dtype's
    tolerance; NaN only where ``ref`` has NaN), else a short reason."""
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            return f"returned {type(out).__name__} where the default returned {len(ref)} outputs"
        for i, (o, r) in enumerate(zip(out, ref)):
            why = mismatch(o, r, rtol)
            if why:
                return f"output {i}: {why}"
        return None
    if not isinstance(ref, torch.Tensor):
        return None if out == ref else f"returned {out!r}, default returned {ref!r}"
    if not isinstance(out, torch.Tensor):
        return f"returned {type(out).__name__}, not a tensor"
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"returned {out.dtype}{list(out.shape)}, default {ref.dtype}{list(ref.shape)}"
    if ref.numel() == 0:
        return None
    if not (ref.is_floating_point() or ref.is_complex()):
        return None if torch.equal(out, ref) else "integer output differs"
    o, r = out.detach().double(), ref.detach().double()
    nan_r = torch.isnan(r)
    if not torch.equal(torch.isnan(o), nan_r):
        return "NaN where the default has none (or the reverse)"
    o, r = o.masked_fill(nan_r, 0), r.masked_fill(nan_r, 0)
    if not torch.equal(torch.isinf(o), torch.isinf(r)):
        return "inf where the default has none (or the reverse)"
    finite = torch.isfinite(r)
    err = (o - r)[finite].abs().max().item() if finite.any() else 0.0
    scale = r[finite].abs().max().item() if finite.any() else 0.0
    tol = rtol if rtol is not None else TOLERANCE.get(ref.dtype, 1e-3)
    if err > tol * max(scale, 1e-30):
        return f"max error {err:.3g} exceeds {tol:g} x max |ref| {scale:.3g}"
    return None
