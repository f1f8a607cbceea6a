"""The Triton fused MoE / grouped GEMM (kernels/triton_moe.py) against plain torch.

On machines without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports Triton), so every shape here is tiny.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from flashtune_compile.kernels.triton_moe import DEFAULT_MOE_TACTIC, fused_moe, grouped_mm  # noqa: E402
from flashtune_compile.kernels.triton_moe_align import align_offsets, align_tokens, padded_size  # noqa: E402
from flashtune_compile.kernels.triton_moe_runner import (  # noqa: E402
    TritonGroupedMMRunner,
    TritonMoeRunner,
    tactics_for,
)
from flashtune_compile.tuner.runner import BucketProfile  # noqa: E402

E, H, I = 4, 24, 20  # H and 2I = 40 are not multiples of the 32-wide tiles: masked edges
TACTICS = [(16, 32, 32, 8, 4, 3), (32, 64, 16, 1, 4, 2)]  # different BLOCK_M: different padding
ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("FLASHTUNE_TRITON_ON_CPU", "1")


def reference_moe(hidden, topk_weights, topk_ids, w1, w2, activation):
    """Token by token, in the eager model's dtypes (transformers' grouped_mm experts forward)."""
    t_count, h = hidden.shape
    e_count, inter = w1.shape[0], w1.shape[1] // 2
    rdt = torch.result_type(hidden, topk_weights)
    out = torch.zeros(t_count, h, dtype=rdt, device=hidden.device)
    for t in range(t_count):
        acc = torch.zeros(h, dtype=rdt, device=hidden.device)
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if not 0 <= e < e_count:
                continue
            g = hidden[t] @ w1[e].T
            y = (ACT[activation](g[:inter]) * g[inter:]) @ w2[e].T
            acc = acc + y * topk_weights[t, j]
        out[t] = acc
    return out.to(hidden.dtype)


def make_moe(t, k, dtype, seed=0, weight_dtype=None, transposed=False):
    g = torch.Generator().manual_seed(seed * 100 + t * 10 + k)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    hidden = r(t, H)
    if k >= E:  # top-k = E: every expert once per token
        ids = torch.stack([torch.randperm(E, generator=g) for _ in range(t)]) if t else torch.zeros(0, k)
    else:  # the last expert receives no token
        ids = torch.randint(0, E - 1, (t, k), generator=g)
    ids = ids.long()
    if t * k >= 2:  # out-of-range ids are dropped
        ids[0, 0] = E
        ids[-1, -1] = -1
    weights = torch.rand(t, k, generator=g).to(weight_dtype or dtype)
    if transposed:  # [E, H, 2I] / [E, I, H] storage seen as [E, 2I, H] / [E, H, I]
        w1 = r(E, H, 2 * I, scale=H**-0.5).transpose(1, 2)
        w2 = r(E, I, H, scale=I**-0.5).transpose(1, 2)
    else:
        w1 = r(E, 2 * I, H, scale=H**-0.5)
        w2 = r(E, H, I, scale=I**-0.5)
    return tuple(x.to(dev()) for x in (hidden, weights, ids, w1, w2))


def assert_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    else:
        scale = ref.float().abs().max().item() if ref.numel() else 1.0
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale)


# ----------------------------------------------------------------------------------------------
# Alignment


def check_alignment(expert_of_row, e_count, block_m, sorted_rows, block_expert):
    s = expert_of_row.numel()
    p = padded_size(s, e_count, block_m)
    assert sorted_rows.dtype == block_expert.dtype == torch.int32
    assert sorted_rows.shape == (p,) and block_expert.shape == (p // block_m,)
    rows, experts = sorted_rows.cpu().tolist(), block_expert.cpu().tolist()
    ids = expert_of_row.cpu().tolist()
    valid = [r for r in range(s) if 0 <= ids[r] < e_count]
    assert sorted(r for r in rows if r != s) == valid  # every valid row exactly once
    assert all(r == s or 0 <= r < s for r in rows)  # everything else is the sentinel
    for b, e in enumerate(experts):
        block = [r for r in rows[b * block_m : (b + 1) * block_m] if r != s]
        if e == -1:
            assert not block
        else:
            assert block and all(ids[r] == e for r in block)  # one expert per block
    assert experts == sorted(experts, key=lambda e: e if e >= 0 else e_count)  # tail blocks last
    order = [r for r in rows if r != s]
    assert order == sorted(order, key=lambda r: (ids[r], r))  # stable sort by expert


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_tokens(block_m):
    g = torch.Generator().manual_seed(block_m)
    ids = torch.randint(-1, E + 1, (37,), generator=g)
    ids[ids == 2] = 1  # expert 2 empty
    check_alignment(ids, E, block_m, *align_tokens(ids.to(dev()), E, block_m))
    empty = torch.zeros(0, dtype=torch.long)
    check_alignment(empty, E, block_m, *align_tokens(empty.to(dev()), E, block_m))


@pytest.mark.parametrize("block_m", [4, 16])
def test_align_offsets(block_m):
    offs = torch.tensor([5, 5, 18, 30], dtype=torch.int32)  # expert 1 empty, rows 30.. in none
    s = 33
    rows = torch.arange(s)
    ids = torch.searchsorted(offs, rows.int(), right=True).long()
    ids[ids == len(offs)] = -1
    check_alignment(ids, len(offs), block_m, *align_offsets(offs.to(dev()), s, block_m))


# ----------------------------------------------------------------------------------------------
# Fused MoE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [0, 1, 5])
@pytest.mark.parametrize("k", [1, 2, E])
def test_fused_moe_matches_reference(dtype, t, k):
    inputs = make_moe(t, k, dtype)
    for tactic, activation in zip(TACTICS, ["silu", "gelu_tanh"]):
        ref = reference_moe(*inputs, activation)
        out = fused_moe(*inputs, activation, tactic)
        assert out.shape == (t, H)
        assert_close(out, ref)


@pytest.mark.parametrize(
    "dtype, weight_dtype",
    [(torch.float32, None), (torch.float16, None), (torch.bfloat16, torch.float32)],
    ids=["fp32", "fp16", "bf16-fp32weights"],
)
def test_fused_moe_strided_operands(dtype, weight_dtype):
    """Transposed expert weights, a sliced hidden state, fp32 routing weights with bf16 states."""
    hidden, weights, ids, w1, w2 = make_moe(5, 2, dtype, seed=1, weight_dtype=weight_dtype, transposed=True)
    assert not w1.is_contiguous() and not w2.is_contiguous()
    wide = torch.cat([hidden, hidden], 1)
    hidden = wide[:, ::2]
    assert not hidden.is_contiguous()
    ref = reference_moe(hidden, weights, ids, w1, w2, "gelu")
    assert_close(fused_moe(hidden, weights, ids, w1, w2, "gelu", TACTICS[1]), ref)


def test_fused_moe_rejects_unknown_activation():
    with pytest.raises(ValueError):
        fused_moe(*make_moe(1, 1, torch.float32), "relu", TACTICS[0])


# ----------------------------------------------------------------------------------------------
# Grouped GEMM


@pytest.mark.parametrize("tactic", TACTICS)
def test_grouped_mm_matches_torch(tactic):
    g = torch.Generator().manual_seed(3)
    s, k, n = 23, 12, 40  # torch._grouped_mm wants 16-byte strides
    x = torch.randn(s, k, generator=g)
    w = torch.randn(E, k, n, generator=g)
    offs = torch.tensor([6, 6, 15, 20], dtype=torch.int32)  # expert 1 empty; rows 20.. in none
    ref = torch._grouped_mm(x, w, offs)
    x, w, offs = x.to(dev()), w.to(dev()), offs.to(dev())
    out = grouped_mm(x, w, offs, tactic).cpu()
    torch.testing.assert_close(out[:20], ref[:20], rtol=1e-4, atol=1e-4)
    assert not out[20:].any()
    # The same weight stored [E, N, K] and seen through a transposed view.
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(grouped_mm(x, wt, offs, tactic).cpu(), out, rtol=1e-5, atol=1e-5)
    assert grouped_mm(x[:0], w, offs, tactic).shape == (0, n)


# ----------------------------------------------------------------------------------------------
# Tactics and runners


def test_tactics_for():
    for m, n, k, nbytes in [
        (1, 4096, 7168, 2),
        (16, 2816, 2048, 2),
        (512, 2816, 2048, 2),
        (4096, 4096, 1408, 2),
        (64, 1024, 1024, 4),
    ]:
        tactics = tactics_for(m, n, k, nbytes)
        assert 4 <= len(tactics) <= 30, (m, len(tactics))
        assert len(set(tactics)) == len(tactics)
        for bm, bn, bk, gm, warps, stages in tactics:
            assert bm <= max(16, 2 * m) and (bm * bk + bk * bn) * nbytes * stages <= 227 * 1024
            assert gm in (1, 8) and warps in (4, 8) and stages in (2, 3, 4)
    assert {t[0] for t in tactics_for(1, 4096, 4096, 2)} == {16}
    assert DEFAULT_MOE_TACTIC == (64, 64, 32, 8, 4, 3)


def profile(inputs):
    shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs)
    return BucketProfile((shapes[0][0],), shapes)


def test_moe_runner(triton_on_cpu):
    hidden, weights, ids, w1, w2 = make_moe(5, 2, torch.float32, seed=2)
    inputs = (hidden, weights, ids, w1, w2, "silu", None)
    runner = TritonMoeRunner()
    assert runner.name == "triton_moe"
    tactics = runner.get_valid_tactics(inputs, profile(inputs))
    assert tactics and all(len(t) == 6 for t in tactics)
    if not torch.cuda.is_available():
        assert len(tactics) <= 4
    ref = reference_moe(*inputs[:6])
    for tactic in [-1, tactics[0]]:
        assert_close(runner.forward(inputs, tactic), ref)
    assert runner.get_valid_tactics(inputs[:5] + ("relu", None), profile(inputs)) == []
    assert runner.get_valid_tactics((hidden, weights, ids, w1.double(), w2, "silu", None), profile(inputs)) == []
    gate, up = w1.chunk(2, dim=1)  # separate gate and up weights: not for the fused kernel
    split = (hidden, weights, ids, gate, w2, "silu", up)
    assert runner.get_valid_tactics(split, profile(split)) == []


def test_grouped_mm_runner(triton_on_cpu):
    x, w = torch.randn(10, 8, device=dev()), torch.randn(3, 8, 16, device=dev())
    offs = torch.tensor([3, 3, 10], dtype=torch.int32, device=dev())
    inputs = (x, w, offs)
    runner = TritonGroupedMMRunner()
    assert runner.name == "triton_grouped_mm"
    tactics = runner.get_valid_tactics(inputs, profile(inputs))
    assert tactics and all(len(t) == 6 for t in tactics)
    ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    for tactic in [-1, tactics[-1]]:
        torch.testing.assert_close(runner.forward(inputs, tactic), ref, rtol=1e-4, atol=1e-4)


def test_runners_not_offered_on_cpu_without_opt_in(monkeypatch):
    monkeypatch.delenv("FLASHTUNE_TRITON_ON_CPU", raising=False)
    cpu = make_moe(2, 2, torch.float32)
    cpu = tuple(x.cpu() for x in cpu) + ("silu", None)
    assert TritonMoeRunner().get_valid_tactics(cpu, profile(cpu)) == []
    gm = (torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([2, 4], dtype=torch.int32))
    assert TritonGroupedMMRunner().get_valid_tactics(gm, profile(gm)) == []


# ----------------------------------------------------------------------------------------------
# Decode-sized MoE (kernels/triton_moe_decode.py)

DECODE_TACTICS = [(16, 128, 1, 4, 3), (32, 16, 2, 4, 3), (16, 16, 4, 2, 2)]  # K chunks: 1, 2, then 3 of 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("t, k", [(0, 2), (1, 1), (1, E), (5, 2)])
def test_decode_moe_matches_reference(dtype, t, k):
    """Every pair against its own expert, picks outside [0, E) dropped, each activation, and K
    split into chunks (H = 24 and I = 20 into 16-deep tiles: partial and empty chunks)."""
    from flashtune_compile.kernels.triton_moe_decode import decode_moe

    inputs = make_moe(t, k, dtype, seed=3)
    for tactic, activation in zip(DECODE_TACTICS, ["silu", "gelu", "gelu_tanh"]):
        out = decode_moe(*inputs, activation, tactic)
        assert out.shape == (t, H)
        assert_close(out, reference_moe(*inputs, activation))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
def test_decode_moe_strided_operands_and_routing_weight_dtypes(weight_dtype):
    from flashtune_compile.kernels.triton_moe_decode import decode_moe

    hidden, weights, ids, w1, w2 = make_moe(3, 2, torch.bfloat16, seed=4, weight_dtype=weight_dtype, transposed=True)
    hidden = torch.cat([hidden, hidden], 1)[:, ::2]
    assert not (hidden.is_contiguous() or w1.is_contiguous() or w2.is_contiguous())
    ref = reference_moe(hidden, weights, ids, w1, w2, "silu")
    assert_close(decode_moe(hidden, weights, ids, w1, w2, "silu", DECODE_TACTICS[1]), ref)


def test_decode_moe_runner_is_offered_for_few_pairs_only(triton_on_cpu):
    from flashtune_compile.kernels.triton_moe_runner import TritonMoeDecodeRunner

    runner = TritonMoeDecodeRunner()
    inputs = (*make_moe(4, 2, torch.bfloat16, seed=5), "gelu_tanh", None)
    tactics = runner.get_valid_tactics(inputs, profile(inputs))
    assert tactics and all(len(t) == 5 for t in tactics)
    ref = reference_moe(*inputs[:6])
    for tactic in [-1, *tactics]:
        assert_close(runner.forward(inputs, tactic), ref)
    many = (*make_moe(17, 2, torch.bfloat16, seed=5), "silu", None)  # 34 pairs
    assert runner.get_valid_tactics(many, profile(many)) == []
    gate, up = inputs[3].chunk(2, dim=1)
    assert runner.get_valid_tactics((*inputs[:3], gate, inputs[4], "silu", up), profile(inputs)) == []
