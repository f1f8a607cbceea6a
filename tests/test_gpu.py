"""The tuner on CUDA tensors: hits launch nothing, CUDA-event timing, graph capture falls back."""

import pytest
import torch
from helpers import MMChunked, MMDefault, mm_config

import flashtune_compile as ft
from flashtune_compile.tuner.profiler import ProfilerSettings, time_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (none on this machine)")


def test_cuda_hit_launches_nothing_and_timing_is_sane(tuner):
    from test_tuner import CountOps

    runners, cfg = (MMDefault(), MMChunked()), mm_config()
    w = torch.randn(64, 64, device="cuda")
    tuner.choose_one("mm", runners, cfg, (torch.randn(30, 64, device="cuda"), w))
    assert tuner.stats.profiles == 4
    x = torch.randn(20, 64, device="cuda")
    with CountOps() as ops:
        tuner.choose_one("mm", runners, cfg, (x, w))
    assert ops.ops == [] and tuner.stats.hits == 1


@pytest.mark.parametrize("cold", [True, False])
def test_cuda_timer_orders_a_big_and_a_small_matmul(cold):
    a, b = torch.randn(2048, 2048, device="cuda"), torch.randn(64, 64, device="cuda")
    big, small = time_cuda([lambda: a @ a, lambda: b @ b], ProfilerSettings(cold_l2=cold))
    assert big.median > 5 * small.median > 0


def test_graph_capture_takes_the_default_without_profiling(cache_dir):
    tuner = ft.AutoTuner()
    runners, cfg = (MMDefault(), MMChunked()), mm_config()
    x, w = torch.randn(30, 64, device="cuda"), torch.randn(64, 64, device="cuda")
    torch.mm(x, w)  # warm cuBLAS before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner, tactic = tuner.choose_one("mm", runners, cfg, (x, w))
        out = runner.forward((x, w), tactic)
    graph.replay()
    torch.cuda.synchronize()
    assert (runner.name, tactic) == ("mm", -1) and tuner.stats.profiles == 0
    torch.testing.assert_close(out, x @ w)
