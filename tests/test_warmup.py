"""ft.warmup: one call per token count tunes every op's bucket once; logging through FLASHTUNE_LOG."""

import logging

import pytest
import torch
from torch import nn

import flashtune_compile as ft
from flashtune_compile import logs
from flashtune_compile.warmup import backend_options, token_axis


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


def _tuned_buckets():
    """(op, weight shape) -> sorted buckets in the cache; the static n=1 graph's as ()."""
    out = {}
    for rec in ft.tactics():
        out.setdefault((rec["op"], rec["shape_key"][1][1]), []).append(rec["bucket"])
    return {k: sorted(v) for k, v in out.items()}


def test_warmup_tunes_every_ladder_bucket_once_and_a_second_warmup_profiles_nothing(tuner):
    model = _model()
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"inner": "eager", "max_tokens": 32})
    first = ft.warmup(compiled, lambda n: (torch.randn(n, 16),), progress=False)

    assert [s.num_tokens for s in first.steps] == [1, 2, 4, 8, 16, 32]  # the ladder up to max_tokens
    want = [(), (2,), (4,), (8,), (16,), (32,)]  # token count 1 compiles its own static graph
    assert _tuned_buckets() == {("linear", (32, 16)): want, ("linear", (16, 32)): want}
    s = ft.stats()
    assert first.tuned == s["misses"] == 12 and s["profiles"] == first.timings > 0
    assert [step.tuned for step in first.steps] == [2] * 6

    ft.reset_stats()
    second = ft.warmup(compiled, lambda n: (torch.randn(n, 16),), progress=False)
    s = ft.stats()
    assert second.tuned == 0 and s["profiles"] == 0 and s["synthesized"] == 0 and s["hits"] == 12
    # Sizes between buckets use the bucket above: nothing new to tune either.
    third = ft.warmup(compiled, lambda n: (torch.randn(n, 16),), num_tokens=[3, 5, 20], progress=False)
    assert [st.bucket for st in third.steps] == [4, 8, 32] and third.tuned == 0 and ft.stats()["profiles"] == 0
    with torch.no_grad():
        x = torch.randn(20, 16)
        torch.testing.assert_close(compiled(x), model(x))


def test_warmup_tunes_a_tune_off_model_and_serving_then_never_profiles(tuner):
    model = _model()
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"inner": "eager", "tune": "off"})
    report = ft.warmup(compiled, lambda n: (torch.randn(n, 16),), num_tokens=[2, 8], progress=False)
    assert report.tuned == 4
    ft.reset_stats()
    with torch.no_grad():
        compiled(torch.randn(7, 16))  # bucket 8: warmed up
        compiled(torch.randn(100, 16))  # bucket 128: unseen, default tactic, counted
    s = ft.stats()
    assert s["profiles"] == 0 and s["hits"] == 2 and s["fallbacks"] == 2


def test_default_token_counts_follow_the_compile_options_or_the_arguments():
    def compiled_with(**options):
        return torch.compile(nn.Linear(4, 4), backend="flashtune", options=options)

    assert token_axis(compiled_with(buckets="pow2", max_tokens=20)).ladder == (1, 2, 4, 8, 16, 32)
    assert backend_options(compiled_with(inner="eager")).inner == "eager"
    assert token_axis(compiled_with()).ladder[-1] == 8192 and len(token_axis(compiled_with()).ladder) == 21
    assert token_axis(compiled_with(max_tokens=20), max_tokens=4).ladder == (1, 2, 4)
    assert token_axis(compiled_with(), buckets=[3, 10], max_tokens=10).ladder == (3, 10)
    assert token_axis(lambda x: x).ladder[-1] == 8192  # not a flashtune model: the backend's defaults


@pytest.mark.parametrize("bad", [[], [0], [4, -1], ["8"], [2.5], [True], 7])
def test_bad_token_counts_are_named(bad):
    with pytest.raises(ValueError, match="num_tokens"):
        ft.warmup(lambda x: x, lambda n: (torch.randn(n, 4),), num_tokens=bad, progress=False)


@pytest.mark.parametrize(
    "kw,name", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "8"}, "max_tokens"), ({"buckets": "fib"}, "ladder")]
)
def test_bad_ladder_arguments_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        ft.warmup(lambda x: x, lambda n: (torch.randn(n, 4),), progress=False, **kw)


def test_progress_bar_names_bucket_and_tuned_ops_and_a_summary_table_closes(tuner, capfd):
    compiled = torch.compile(_model(), backend="flashtune", dynamic=True, options={"inner": "eager"})
    ft.warmup(compiled, lambda n: torch.randn(n, 16), num_tokens=[1, 2, 4])
    err = capfd.readouterr().err
    assert "flashtune warmup" in err and "3/3" in err and "tokens=4 bucket=4" in err
    assert "tuning linear [4]" in err and "tuned=6" in err
    assert "buckets tuned" in err and "total" in err  # the closing table


def test_a_failing_call_keeps_what_was_tuned_and_leaves_no_listener(tuner):
    compiled = torch.compile(_model(), backend="flashtune", dynamic=True, options={"inner": "eager"})

    def make_inputs(n):
        if n == 8:
            raise RuntimeError("tokenizer broke")
        return (torch.randn(n, 16),)

    with pytest.raises(RuntimeError, match="tokenizer broke"):
        ft.warmup(compiled, make_inputs, num_tokens=[2, 4, 8], progress=False)
    assert tuner.listeners == []
    on_disk = ft.AutoTuner(settings=tuner.settings)  # a new process's view of the same cache dir
    assert len(on_disk.cache.snapshot()) == 4


def test_warmup_learns_moe_routing_from_its_calls(tuner):
    """With moe_routing="learned", each warmup size's real routing is what later profiling draws from."""
    from test_moe import H, make_layer, moe_site

    from flashtune_compile.ops import routing

    w1, w2 = make_layer(4, torch.float32)
    site = moe_site(4, 2, torch.float32, routing_kind="learned")

    class Experts(nn.Module):  # a router that always picks experts 1 and 3
        def forward(self, h):
            ids = torch.tensor([1, 3]).expand(h.shape[0], 2)
            return torch.ops.flashtune.moe(h, torch.full((h.shape[0], 2), 0.5), ids, w1, w2, "silu", None, site)

    compiled = torch.compile(Experts(), backend="flashtune", dynamic=True, options={"inner": "eager"})
    report = ft.warmup(compiled, lambda n: (torch.randn(n, H),), num_tokens=[2, 8], progress=False)
    assert report.tuned == 2
    assert routing.learned_routing().counts(4, 2).tolist() == [0, 10, 0, 10]  # 2 + 8 tokens, each picking 1 and 3


def test_flashtune_log_levels_go_to_stderr_and_bad_levels_are_named(tuner, monkeypatch, capfd):
    logger = logging.getLogger("flashtune")
    saved = logger.level, logger.propagate, list(logger.handlers)
    try:
        monkeypatch.setenv("FLASHTUNE_LOG", "debug")
        logs.configure_from_env()
        logs.configure_from_env()  # idempotent: one handler
        assert sum(getattr(h, "flashtune_env", False) for h in logger.handlers) == 1
        compiled = torch.compile(_model(), backend="flashtune", dynamic=True, options={"inner": "eager"})
        ft.warmup(compiled, lambda n: (torch.randn(n, 16),), num_tokens=[4], progress=False)
        err = capfd.readouterr().err
        assert "INFO flashtune: tuned linear bucket (4,)" in err  # info: each bucket tuned
        assert "DEBUG flashtune: linear bucket (4,) medians: aten_linear[-1]" in err  # debug: every timing
        monkeypatch.setenv("FLASHTUNE_LOG", "loud")
        with pytest.raises(ValueError, match="FLASHTUNE_LOG='loud'.*debug"):
            logs.configure_from_env()
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]
