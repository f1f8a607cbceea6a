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


def test_graph_replay_timing_orders_matmuls_and_refuses_host_syncs():
    a, b = torch.randn(2048, 2048, device="cuda"), torch.randn(64, 64, device="cuda")
    settings = ProfilerSettings(cuda_graph=True)
    big, small, syncing = time_cuda([lambda: a @ a, lambda: b @ b, lambda: (b @ b).sum().item()], settings)
    assert big.median > 5 * small.median > 0 and syncing is None
    (default,) = time_cuda([lambda: (b @ b).sum().item()], settings)  # the default is timed anyway, eagerly
    assert default is not None and default.median > 0


@pytest.mark.parametrize("illegal", ["item", "stream_query"])
def test_a_failed_capture_leaves_random_numbers_and_later_captures_working(illegal):
    """The candidate is fine in its warm-up and breaks the capture only on its second call, so the
    capture really fails; torch would then leave the RNG in capture mode and a dead graph's pool
    registered (the next randn raises, the next capture crashes the process)."""
    from flashtune_compile.tuner.profiler import _captured

    a, calls = torch.randn(256, 256, device="cuda"), [0]

    def breaks_capture():
        calls[0] += 1
        y = a @ a
        if calls[0] > 1:
            y.sum().item() if illegal == "item" else torch.cuda.current_stream().query()
        return y

    with pytest.raises(RuntimeError):
        _captured(breaks_capture)
    assert calls[0] == 2
    assert torch.randn(1000, device="cuda").std().item() > 0.5  # the generator left capture mode
    out = torch.empty(256, 256, device="cuda")
    replay = _captured(lambda: torch.mm(a, a, out=out))
    out.zero_()
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, a @ a)


def test_without_graphs_a_call_costs_at_least_its_host_time():
    """A kernel that is fast on the GPU but slow to issue from Python is timed at its issue rate
    (launched one by one, the GPU would wait on the host); a graph replay is not."""
    import time

    b = torch.randn(64, 64, device="cuda")

    def slow_to_issue():
        until = time.perf_counter() + 300e-6
        while time.perf_counter() < until:
            pass
        return b @ b

    eager, fast = time_cuda([slow_to_issue, lambda: b @ b], ProfilerSettings())
    assert eager.median >= 250e-6 > 10 * fast.median
    (graphed,) = time_cuda([slow_to_issue], ProfilerSettings(cuda_graph=True))
    assert graphed.median < 100e-6


class MMHostSync(MMChunked):
    """Correct, but reads a value on the host: cannot run inside a CUDA graph."""

    name = "mm_host_sync"

    def forward(self, inputs, tactic=-1):
        inputs[0].sum().item()
        return super().forward(inputs, tactic)


def test_graph_timed_tuning_never_chooses_an_uncapturable_candidate(tuner, tmp_path):
    runners, cfg = (MMDefault(), MMHostSync()), mm_config()
    cache = tuner.cache_for(tmp_path, cuda_graph=True)
    x, w = torch.randn(64, 256, device="cuda"), torch.randn(256, 256, device="cuda")
    (runner, _), _ = tuner.choose_cached("mm", runners, cfg, (x, w), cache=cache)
    (entry,) = cache.entries.values()
    assert runner.name == "mm" and any("cannot be captured in a CUDA graph" in r for r in entry.rejected)


def test_reduce_overhead_tunes_in_warmup_and_replays_graphs(tuner, cache_dir):
    import torch.nn as nn

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).cuda().half()
    compiled = torch.compile(model, backend="flashtune", mode="reduce-overhead", dynamic=True)
    with torch.no_grad():
        for n in (8, 64):
            x = torch.randn(n, 256, device="cuda", dtype=torch.half)
            for _ in range(4):  # warm-up (tunes), record, replays
                out = compiled(x)
            torch.testing.assert_close(out, model(x), rtol=2e-2, atol=2e-2)
    records = ft.tactics()
    assert records and {r["timing"] for r in records} == {"cold_l2+cuda_graph"}
    assert ft.stats()["fallbacks"] == 0  # nothing was first seen during capture


def test_triton_precompile_then_every_tactic_is_correct():
    from flashtune_compile.kernels.triton_runner import TritonGemmRunner
    from flashtune_compile.ops.matmul import MM
    from flashtune_compile.tuner.runner import BucketProfile

    a = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    runner = TritonGemmRunner.for_op(MM)
    tactics = runner.get_valid_tactics((a, b), BucketProfile((64,), (a.shape, b.shape)))
    runner.precompile((a, b), tactics)
    for t in tactics:
        torch.testing.assert_close(runner.forward((a, b), t), a @ b, rtol=2e-2, atol=2e-1)


def test_the_aten_moe_default_can_be_captured_in_a_cuda_graph():
    """No host sync in the default MoE path (sort, counts, grouped GEMMs, combine)."""
    from flashtune_compile.kernels.moe import moe_grouped

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    ids = torch.randint(0, 4, (16, 2), device="cuda", generator=g)
    weights = torch.rand(16, 2, device="cuda", generator=g)
    w1 = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, generator=g) / 8
    w2 = torch.randn(4, 64, 32, device="cuda", dtype=torch.bfloat16, generator=g) / 8
    args = (hidden, weights, ids, w1, w2, "silu")
    expected = moe_grouped(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_grouped(*args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("kernel", ["triton_gemm", "triton_skinny", "triton_moe_decode"])
def test_warm_triton_calls_never_enter_tritons_python_launcher(monkeypatch, kernel):
    """After a tactic's first launch, its later calls launch the compiled kernels through bound
    launchers: JITFunction.run (Triton's full Python launch path) is never called, and the result
    stays right."""
    import triton.runtime.jit as jit

    from flashtune_compile.kernels import triton_launch
    from flashtune_compile.kernels.moe import moe_loop
    from flashtune_compile.kernels.triton_moe_runner import TritonMoeDecodeRunner
    from flashtune_compile.kernels.triton_runner import TritonGemmRunner, TritonSkinnyRunner
    from flashtune_compile.ops.matmul import LINEAR
    from flashtune_compile.tuner.runner import BucketProfile

    dt = torch.float16
    if kernel == "triton_moe_decode":
        runner = TritonMoeDecodeRunner()
        hidden = torch.randn(2, 256, device="cuda", dtype=dt)
        ids = torch.tensor([[0, 3], [1, 3]], device="cuda")
        weights = torch.rand(2, 2, device="cuda")
        w1 = torch.randn(4, 2 * 128, 256, device="cuda", dtype=dt) / 16
        w2 = torch.randn(4, 256, 128, device="cuda", dtype=dt) / 16
        inputs = (hidden, weights, ids, w1, w2, "silu", None)
        shapes = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs)
        ref = moe_loop(hidden.float(), weights, ids, w1.float(), w2.float(), "silu")
        profile = BucketProfile((2,), shapes)
    else:
        runner = (TritonGemmRunner if kernel == "triton_gemm" else TritonSkinnyRunner).for_op(LINEAR)
        x, w = torch.randn(8, 512, device="cuda", dtype=dt), torch.randn(256, 512, device="cuda", dtype=dt) / 16
        inputs, ref = (x, w, None), torch.nn.functional.linear(x.float(), w.float())
        profile = BucketProfile((8,), (x.shape, w.shape, None))
    tactic = runner.get_valid_tactics(inputs, profile)[0]
    runner.forward(inputs, tactic)  # compiles and binds
    calls = []
    run = jit.JITFunction.run
    monkeypatch.setattr(jit.JITFunction, "run", lambda self, *a, **k: calls.append(self) or run(self, *a, **k))
    for _ in range(3):
        out = runner.forward(inputs, tactic)
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert calls == []
    assert any(type(v).__name__ == "BoundLaunch" for v in triton_launch.bound_launchers().values())
