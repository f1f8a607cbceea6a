"""The inner Inductor is reachable (mode=, inductor_config), and CUDA-graph deployments keep their
own, graph-timed winners. What needs a GPU (capture, replay timing) is in test_gpu.py."""

import json
import logging
import sys

import pytest
import torch
import torch.nn as nn
from helpers import MMChunked, MMDefault, mm_config

import flashtune_compile as ft
from flashtune_compile.tuner.cache import default_cache_dir
from flashtune_compile.tuner.profiler import ProfilerSettings

backend_module = sys.modules["flashtune_compile.backend"]  # ft.backend is the function


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _docs(directory):
    """{timing mode: [bucket, ...]} of every tactic document in ``directory``."""
    out = {}
    for doc in directory.glob("tactics-*.json"):
        data = json.loads(doc.read_text())
        out[data["env"]["timing"]] = sorted(tuple(e["bucket"]) for e in data["entries"])
    return out


@pytest.mark.parametrize(
    "options, message",
    [
        ({"mode": "fastest"}, "mode must be one of .*'reduce-overhead'"),
        ({"inductor_config": {"freezin": True}}, "'freezin' is not a torch._inductor.config setting.*'freezing'"),
        ({"inductor_config": ["freezing"]}, "'inductor_config' must be a dict"),
        ({"inner": "eager", "mode": "max-autotune"}, "apply to inner='inductor' only"),
        ({"inner": "eager", "inductor_config": {"freezing": True}}, "apply to inner='inductor' only"),
    ],
)
def test_bad_inductor_options_are_named(options, message):
    with pytest.raises(Exception, match=message):
        torch.compile(nn.Linear(4, 4), backend="flashtune", options=options)(torch.randn(2, 4))


def test_mode_and_inductor_config_reach_the_inner_compiler():
    opts = backend_module.parse_options({"mode": "max-autotune", "inductor_config": {"freezing": True}})
    patches = opts.inductor_patches()
    assert patches["max_autotune"] is True and patches["triton.cudagraphs"] is True and patches["freezing"] is True
    # torch.compile's own mode= wins over the option; an explicit inductor_config entry wins over both
    opts = backend_module.parse_options({"mode": "reduce-overhead", "inductor_config": {"triton.cudagraphs": False}})
    assert opts.inductor_patches("max-autotune")["max_autotune"] is True
    assert opts.cuda_graphs() is False and opts.site_options().cuda_graph is False
    assert backend_module.parse_options({"mode": "reduce-overhead"}).site_options().cuda_graph is True
    assert backend_module.parse_options({}).site_options("reduce-overhead").cuda_graph is True
    assert backend_module.parse_options({}).site_options().cuda_graph is False


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_torch_compile_mode_works_and_equals_eager(tuner, mode):
    """torch.compile passes mode= to the backend; on the CPU Inductor skips CUDA graphs."""
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    compiled = torch.compile(model, backend="flashtune", mode=mode, dynamic=True)
    for n in (2, 5, 12):  # not 1: Dynamo specializes size 1 (a second graph)
        x = torch.randn(n, 16)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert ft.stats()["routed_ops"] == 2


def test_inductor_config_freezing_is_applied(tuner):
    """Freezing (an inference setting users rely on) still works through flashtune, whose ops keep
    the weights they are given."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    compiled = torch.compile(model, backend="flashtune", options={"inductor_config": {"freezing": True}})
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert ft.stats()["routed_ops"] == 2


def test_inductor_cpp_wrapper_compiles_flashtune_ops_and_equals_eager(tuner, tmp_path):
    """Inductor's C++ wrapper writes each op's arguments into C++, the site string as a literal:
    with a cache directory whose name holds a quote, a backslash and a percent sign, the model
    still compiles, tunes into that directory, and equals eager."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    cache = tmp_path / 'it\'s a \\ 50% "dir"'
    options = {"cache_dir": str(cache), "inductor_config": {"cpp_wrapper": True}}
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options=options)
    with torch.no_grad():
        for n in (2, 5):
            x = torch.randn(n, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert ft.stats()["routed_ops"] == 2
    assert {e["cache_dir"] for e in ft.tactics()} == {str(cache)}


def test_cuda_graph_deployments_keep_their_own_winners(tuner, cache_dir):
    """A model whose inner Inductor replays CUDA graphs tunes into a cache whose environment says
    so (its own file): eager-timed and graph-timed winners never serve each other."""
    model = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    torch.compile(model, backend="flashtune", options={"inner": "inductor"})(x)
    torch._dynamo.reset()
    torch.compile(model, backend="flashtune", mode="reduce-overhead")(x)
    assert ft.stats()["misses"] == 2  # the graph-timed cache did not take the eager-timed winner
    assert _docs(cache_dir) == {"cold_l2": [()], "cold_l2+cuda_graph": [()]}
    assert sorted(r["timing"] for r in ft.tactics()) == ["cold_l2", "cold_l2+cuda_graph"]


def test_graph_timed_cache_is_another_environment(tuner, tmp_path):
    eager, graphed = tuner.cache_for(tmp_path), tuner.cache_for(tmp_path, cuda_graph=True)
    assert eager is not graphed and eager.path != graphed.path
    assert graphed.env == {**eager.env, "timing": "cold_l2+cuda_graph"}
    assert tuner.cache_for(tmp_path, cuda_graph=True) is graphed
    runners, cfg = (MMDefault(), MMChunked()), mm_config()
    inputs = (torch.randn(6, 16), torch.randn(16, 16))
    tuner.choose_cached("mm", runners, cfg, inputs, cache=graphed)
    assert graphed.entries and not eager.entries
    assert ProfilerSettings(cuda_graph=True).mode == "cold_l2+cuda_graph"


def test_every_bucket_records_its_tuning_seconds(tuner, cache_dir):
    runners, cfg = (MMDefault(), MMChunked()), mm_config()
    tuner.choose_one("mm", runners, cfg, (torch.randn(6, 16), torch.randn(16, 16)))
    (record,) = ft.tactics()
    assert record["tune_s"] > 0
    reread = ft.AutoTuner(cache_dir=cache_dir)  # from disk
    assert [r["tune_s"] for r in reread.tactics()] == [record["tune_s"]]


def test_default_cache_dir_without_platformdirs(monkeypatch, tmp_path):
    """The GPU machine has no platformdirs: the XDG rule stands in."""
    monkeypatch.setitem(sys.modules, "platformdirs", None)  # import now raises ImportError
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "flashtune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == __import__("pathlib").Path.home() / ".cache" / "flashtune"


def test_mode_is_logged_with_the_routing(tuner, caplog):
    caplog.set_level(logging.INFO, logger="flashtune")
    torch.compile(nn.Linear(4, 4), backend="flashtune", mode="reduce-overhead")(torch.randn(2, 4))
    assert "'triton.cudagraphs': True" in caplog.text and "timed as CUDA graph replays" in caplog.text
