"""Aligning rows for the fused-MoE kernel (plain torch, no host sync, so a CUDA graph can hold it).

Rows (for the MoE, the flattened (token, k) pairs) are sorted by expert and every expert's group is
padded up to a multiple of BLOCK_M with a sentinel, into a buffer whose size depends on the shapes
only. Each BLOCK_M block of that buffer then belongs to one expert (``triton_moe.py``).
"""

from __future__ import annotations

import torch


def padded_size(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the aligned length: every non-empty expert (at most
    min(E, S) of them) pads by at most block_m - 1."""
    bound = num_rows + min(num_experts, num_rows) * (block_m - 1)
    return -(-bound // block_m) * block_m


def _align(key: torch.Tensor, num_experts: int, block_m: int, presorted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """key[r] in [0, E] (E = no expert) for every row r; ``presorted``: key is non-decreasing."""
    s, e_count, dev = key.numel(), num_experts, key.device
    p = padded_size(s, e_count, block_m)
    key = key.long()
    if presorted:
        order = torch.arange(s, device=dev)
        skey = key
    else:
        order = torch.argsort(key, stable=True)
        skey = key[order]
    counts = torch.zeros(e_count + 1, device=dev, dtype=torch.long).scatter_add_(0, key, torch.ones_like(key))
    group_start = torch.cumsum(counts, 0) - counts  # unpadded start of each group in sorted order
    padded = (counts[:e_count] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = torch.cat([padded_end - padded, padded_end.new_full((1,), p)])  # slot E: the dump
    pos = torch.arange(s, device=dev)
    dest = padded_start[skey] + (pos - group_start[skey])
    dest = torch.where(skey < e_count, dest, p)  # rows without an expert land in a dropped slot
    sorted_rows = torch.full((p + 1,), s, device=dev, dtype=torch.int32)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, p, block_m, device=dev, dtype=torch.long)
    block_expert = torch.searchsorted(padded_end, starts, right=True)  # first expert ending past the start
    block_expert = torch.where(block_expert < e_count, block_expert, -1).to(torch.int32)
    return sorted_rows[:p], block_expert


def align_tokens(expert_of_row: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort rows 0..S-1 by expert (stable) and pad every expert's group to a multiple of block_m
    with the sentinel S. Returns ``(sorted_rows int32 [P], block_expert int32 [P // block_m])``
    with P = ``padded_size(S, E, block_m)``; unused tail blocks have expert -1. Rows whose expert
    is outside [0, E) are dropped."""
    key = expert_of_row.reshape(-1).long()
    key = torch.where((key >= 0) & (key < num_experts), key, num_experts)
    return _align(key, num_experts, block_m, presorted=False)


def align_offsets(offs: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``align_tokens`` for rows already grouped by expert as in ``torch._grouped_mm``:
    rows offs[e-1] .. offs[e]-1 belong to expert e, rows >= offs[-1] to none."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    key = torch.searchsorted(offs, rows, right=True)  # == E for rows past offs[-1]
    return _align(key, offs.numel(), block_m, presorted=True)
