"""Bucket ladders map sizes up; synthesized inputs have the bucket's shapes and the real layout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashtune_compile as ft
from flashtune_compile.tuner.buckets import hybrid_ladder, make_ladder, pow2_ladder
from flashtune_compile.tuner.synth import synthesize


def test_ladders():
    assert pow2_ladder(8) == (1, 2, 4, 8) and pow2_ladder(9)[-1] == 16
    h = hybrid_ladder(8192)
    assert h[:9] == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert h[9:16] == (512, 768, 1024, 1280, 1536, 1792, 2048)
    assert h[16:] == (2560, 3072, 3584, 4096, 8192)
    assert make_ladder("pow2", max_size=100, min_size=5) == (8, 16, 32, 64, 128)
    assert make_ladder([3, 10, 50], max_size=20) == (3, 10, 50)
    with pytest.raises(ValueError, match="strictly increasing"):
        make_ladder([4, 2], 8)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 100_000), ladder=st.sampled_from(["pow2", "hybrid", (3, 17, 100)]), top=st.integers(1, 10_000)
)
def test_a_size_maps_to_the_smallest_bucket_at_least_as_large(size, ladder, top):
    spec = ft.DynamicDim(0, 0, buckets=ladder, max_size=top)
    b = spec.bucket(size)
    assert b >= size
    if size <= spec.ladder[-1]:
        assert b in spec.ladder and all(x < size for x in spec.ladder if x < b)
    else:
        assert b == 1 << (size - 1).bit_length()  # beyond the top: its own power of two


def test_zero_is_its_own_bucket():
    assert ft.DynamicDim(0, 0).bucket(0) == 0


def test_synthesized_inputs_have_bucket_shapes_and_real_layout():
    x = torch.randn(5, 16)
    w_t = torch.randn(16, 32).t()  # transposed weight: layout must survive
    ids = torch.randint(3, 7, (5, 2))
    cfg = ft.TuningConfig(dynamic=(ft.DynamicDim(input_idx=(0, 2), dim_idx=(0, 0)),))
    (sx, sw, sids), shapes, made = synthesize((x, w_t, ids), cfg, (8,))
    assert shapes == ((8, 16), (32, 16), (8, 2)) and made == 2
    assert sw is w_t  # unchanged static input reused, not copied
    assert sx.shape == (8, 16) and sx.dtype == x.dtype
    assert sids.shape == (8, 2) and sids.min() >= 3 and sids.max() <= 6  # ids stay in range
    x_t = torch.randn(16, 5).t()
    (sxt, *_), _, _ = synthesize((x_t, w_t, ids), cfg, (8,))
    assert not sxt.is_contiguous() and sxt.t().is_contiguous()


def test_initializer_and_constraint_are_honoured():
    def offsets(shape, dtype, device):
        return torch.arange(shape[0], dtype=dtype, device=device) * 2

    x, offs = torch.randn(6, 4), torch.tensor([0, 2, 4], dtype=torch.int32)
    cfg = ft.TuningConfig(
        dynamic=(ft.DynamicDim(0, 0, buckets="pow2"),),
        constraints=(ft.ConstraintSpec(input_idx=1, dim_idx=0, infer=lambda shapes: shapes[0][0] // 2),),
        initializers={1: offsets},
    )
    (sx, soffs), shapes, made = synthesize((x, offs), cfg, (8,))
    assert shapes == ((8, 4), (4,)) and made == 2
    assert soffs.tolist() == [0, 2, 4, 6] and soffs.dtype == torch.int32


def test_bad_initializer_is_named():
    cfg = ft.TuningConfig(dynamic=(ft.DynamicDim(0, 0),), initializers={0: lambda s, d, dev: torch.zeros(1)})
    with pytest.raises(ValueError, match="initializer for input 0"):
        synthesize((torch.randn(3, 4),), cfg, (4,))


def test_dims_shared_across_inputs_are_validated():
    with pytest.raises(ValueError, match="two DynamicDims"):
        ft.TuningConfig(dynamic=(ft.DynamicDim(0, 0), ft.DynamicDim(0, 0)))
    with pytest.raises(ValueError, match="min_size"):
        ft.DynamicDim(0, 0, min_size=10, max_size=5)
