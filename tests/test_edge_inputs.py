"""Every matmul-family call eager accepts works through the backend and gives eager's answer
(within eager's own error against float64), forward and backward: zero-size dims anywhere, any
strides, every routed form. Cases: matmul_cases.py; a long run: benchmarks/fuzz_matmul.py."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from matmul_cases import Case, cases, check

import flashtune_compile as ft

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def fresh(cache_dir):
    old = ft.AutoTuner.reset(ft.AutoTuner(cache_dir=None, settings=ft.ProfilerSettings(block_seconds=2e-4, rounds=3)))
    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = 10_000  # one function object compiled for many shapes
    yield
    torch._dynamo.config.cache_size_limit = limit
    torch._dynamo.reset()
    ft.AutoTuner.reset(old)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=400, **SETTINGS)
@given(case=cases())
# The crashes this test was written for: K = 0 and N = 0 in backward (reshape(-1, 0) is ambiguous).
@example(Case("linear", ((2, 3, 5, 0), (4, 0)), F32, ("contiguous",) * 2, (True, True), False, 0))
@example(Case("linear_bias", ((5, 3), (0, 3), (0,)), F32, ("contiguous",) * 3, (True, True, True), True, 1))
@example(Case("matmul", ((2, 3, 5, 0), (0, 4)), BF16, ("sliced", "transposed"), (True, True), False, 2))
@example(Case("mm", ((3, 0), (0, 3)), BF16, ("transposed", "transposed"), (False, True), False, 3))
@example(Case("at_t", ((8, 8), (0, 8)), F32, ("transposed", "expanded"), (False, True), True, 4))
def test_compiled_matches_eager_on_any_matmul_call(case):
    torch._dynamo.reset()
    check(case, inner="eager")


@settings(max_examples=8, **SETTINGS)
@given(case=cases())
def test_with_inductor_inside_too(case):
    torch._dynamo.reset()
    check(case, inner="inductor")
