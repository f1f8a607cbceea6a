"""Weight copies (tuner/weights.py): at most one per weight, inside the budget, chosen by time saved
per byte, never made again and again; and an op whose copy is refused running a tactic without one."""

import gc
import time

import pytest
import torch
import torch.nn as nn
from helpers import MMSlow

import flashtune_compile as ft
from flashtune_compile.kernels.cpp import load_blocked_gemm
from flashtune_compile.tuner import memory as memory_module
from flashtune_compile.tuner import weights as weights_module
from flashtune_compile.tuner.cache import Entry
from flashtune_compile.tuner.weights import CopyDenied, WeightCache, admitting

COPY = 8 * 8 * 4  # bytes of one copy of an 8 x 8 fp32 weight


def _param() -> nn.Parameter:
    return nn.Parameter(torch.randn(8, 8), requires_grad=False)


def _get(store: WeightCache, w: torch.Tensor, kind: str = "t", gain: float | None = None) -> torch.Tensor:
    return admitting(store, lambda: store.get(w, kind, lambda t: t.t().contiguous(), w.numel() * 4), gain)


def test_copies_stay_inside_the_budget_and_a_refusal_sticks_until_the_weight_changes():
    store = WeightCache(max_bytes=3 * COPY)
    ws = [_param() for _ in range(4)]
    for w in ws[:3]:
        torch.testing.assert_close(_get(store, w), w.t())
    with pytest.raises(CopyDenied, match="is full"):
        _get(store, ws[3])
    assert store.nbytes == 3 * COPY and store.made == 3 and store.denied == 1
    for _ in range(5):  # the refusal is remembered: asked again, nothing is decided or made again
        with pytest.raises(CopyDenied, match="budget"):
            store.get(ws[3], "t", lambda t: t.t().contiguous(), COPY)
    assert store.made == 3 and store.denied == 1
    for _ in range(5):  # held copies are served as they are
        _get(store, ws[0])
    assert store.made == 3
    with torch.no_grad():
        ws[3].mul_(2)  # a changed weight is decided again (and refused again: still no room)
    with pytest.raises(CopyDenied):
        _get(store, ws[3])
    assert store.denied == 2
    del ws[0], w
    gc.collect()  # a weight's death frees its copy; then there is room
    assert store.nbytes == 2 * COPY
    with torch.no_grad():
        ws[2].add_(1)
    torch.testing.assert_close(_get(store, ws[2]), ws[2].t())  # remade from the new values
    torch.testing.assert_close(_get(store, ws[-1]), ws[-1].t())
    assert store.nbytes == 3 * COPY


def test_a_copy_worth_more_per_byte_displaces_cheaper_ones_which_then_stay_out():
    store = WeightCache(max_bytes=2 * COPY, promote_after=1)
    a, b, c, d = (_param() for _ in range(4))
    _get(store, a, gain=1e-6)
    _get(store, b, gain=2e-6)
    _get(store, c, gain=5e-6)  # worth more per byte than a: a makes way
    assert store.displaced == 1 and store.nbytes == 2 * COPY
    with pytest.raises(CopyDenied, match="displaced"):
        store.get(a, "t", lambda t: t.t().contiguous(), COPY)
    with pytest.raises(CopyDenied, match="nothing held is worth less"):
        _get(store, d, gain=1e-7)  # worth less than everything held: refused
    made = store.made
    for _ in range(10):  # no thrash: a displaced or refused weight is not made again
        for w in (a, d):
            with pytest.raises(CopyDenied):
                _get(store, w, gain=9e-6)
        _get(store, b, gain=2e-6)
        _get(store, c, gain=5e-6)
    assert store.made == made and store.displaced == 1


def test_a_weight_holds_one_kind_of_copy():
    store = WeightCache(max_bytes=10 * COPY, promote_after=1)
    w, v = _param(), _param()
    _get(store, w, "t", gain=1e-6)
    with pytest.raises(CopyDenied, match="one copy per weight"):
        _get(store, w, "other", gain=1e-3)  # a site's priced request never replaces it
    assert store.nbytes == COPY
    _get(store, v, "t", gain=1e-6)
    _get(store, v, "other")  # a direct forward call asked for that tactic: its copy replaces the other
    held = {kind: ident[0] for (kind, ident), h in store._entries.items() if h.value is not None}
    assert store.nbytes == 2 * COPY and held == {"t": id(w), "other": id(v)}


def test_a_trial_drops_every_copy_it_made_and_leaves_no_marks():
    store = WeightCache(max_bytes=3 * COPY, promote_after=1)
    w, big, held = _param(), nn.Parameter(torch.randn(64, 8), requires_grad=False), _param()
    _get(store, held, "a", gain=1e-6)
    with store.trial():
        _get(store, w, "a")
        _get(store, w, "b")  # several kinds of one weight coexist while a bucket is tuned
        with pytest.raises(CopyDenied):
            _get(store, big, "a")  # 2 KiB: does not fit, and displaces nothing
        with pytest.raises(CopyDenied, match="one copy per weight"):
            _get(store, held, "b")  # a weight holding a copy keeps its kind
        assert store.nbytes == 3 * COPY
    assert store.nbytes == COPY and [k for k, _ in store._entries] == ["a"]  # what was held before stays
    _get(store, w, "b", gain=1e-6)  # a site asks again: made (one kind, no leftovers)
    store.max_bytes = 20 * COPY
    _get(store, big, "a", gain=1e-6)  # refused in the trial, but no mark was left: decided afresh
    assert store.nbytes == 2 * COPY + 2048


def test_a_sites_copy_is_made_only_once_its_weight_is_called_often():
    store = WeightCache(max_bytes=10 * COPY, promote_after=3)
    w = _param()
    for _ in range(2):  # a bucket used once or twice (a prompt's prefill) holds no memory
        with pytest.raises(CopyDenied, match="waiting for 3 calls"):
            _get(store, w, gain=1e-6)
    assert store.made == 0 and store.nbytes == 0 and store.denied == 0
    torch.testing.assert_close(_get(store, w, gain=1e-6), w.t())  # the third call makes it
    assert store.made == 1
    v = _param()
    torch.testing.assert_close(_get(store, v), v.t())  # a direct forward call does not wait


def test_the_default_budget_is_a_share_of_the_weights_and_never_past_free_memory(monkeypatch):
    store = WeightCache(share=0.5, floor=0)
    ws = [nn.Parameter(torch.randn(256, 256), requires_grad=False) for _ in range(4)]  # 256 KiB each
    store.register(ws)
    store.register(ws[:2])  # counted once
    assert store.weight_bytes == 4 * 256 * 1024 and store.budget() == 2 * 256 * 1024
    monkeypatch.setattr(weights_module, "available_bytes", lambda: 100 * 1024)
    budget, source = store.budget_and_source()
    assert budget == 100 * 1024 and "memory available" in source
    del ws
    gc.collect()
    assert store.weight_bytes == 0
    monkeypatch.setenv("FLASHTUNE_WEIGHT_CACHE_MB", "12")
    assert memory_module.max_bytes_from_env() == 12 * 2**20
    monkeypatch.setenv("FLASHTUNE_WEIGHT_CACHE_MB", "auto")
    assert memory_module.max_bytes_from_env() is None
    monkeypatch.setenv("FLASHTUNE_WEIGHT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="FLASHTUNE_WEIGHT_CACHE_MB='lots'"):
        memory_module.max_bytes_from_env()


class Stack(nn.Module):
    """Six 64 x 64 linears: one call site (one shape), six weights of 16 KiB."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64, bias=False, dtype=dtype) for _ in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _force_blocked_winner(tuner):
    """Rewrite every cached linear winner to the blocked kernel (a copy tactic) with the rows kernel
    (no copy) as its fallback: what a tuning run on a machine where the packed copy wins leaves."""
    for key, entry in tuner.cache.snapshot().items():
        forced = Entry("cpu_blocked", (1, 2, 1, 0), 1e-6, entry.default_s)
        forced.fallback_runner, forced.fallback_tactic, forced.fallback_s = "cpu_rows", (1, 2, 0), 2e-6
        tuner.cache.put(key, forced)


def test_where_the_budget_is_full_the_op_runs_its_fallback_and_never_repacks(tuner):
    load_blocked_gemm()
    torch._dynamo.reset()
    model = Stack().requires_grad_(False)
    compiled = torch.compile(model, backend="flashtune", options={"inner": "eager", "kernels": {"aten", "cpu"}})
    x = torch.randn(1, 64)
    store = tuner.weights
    with torch.no_grad():
        want = model(x)
        compiled(x)  # tunes the one bucket
        _force_blocked_winner(tuner)
        store.clear()
        store.max_bytes = 2 * 16 * 1024  # room for two of the six packed copies
        ft.reset_stats()
        made, denied = store.made, store.denied
        for _ in range(store.promote_after - 1):  # the copies wait for their weights' first calls
            torch.testing.assert_close(compiled(x), want)
        assert store.made == made and store.nbytes == 0
        for _ in range(5):
            torch.testing.assert_close(compiled(x), want)
    stats = ft.stats()
    assert store.made - made == 2 and store.denied - denied == 4  # decided once per weight
    assert stats["weight_cache_bytes"] == 2 * 16 * 1024 and stats["weight_copies_denied"] == store.denied
    assert stats["misses"] == 0  # the forced winner came from the cache: nothing was tuned again


def test_tuning_leaves_at_most_one_copy_per_weight(tuner):
    torch._dynamo.reset()
    model = Stack(torch.bfloat16).requires_grad_(False)
    compiled = torch.compile(
        model, backend="flashtune", dynamic=True, options={"inner": "eager", "kernels": {"aten", "cpu"}}
    )
    with torch.no_grad():
        for n in (1, 3, 16):  # three buckets of one site, each tuned with every kind of copy
            x = torch.randn(n, 64, dtype=torch.bfloat16)
            torch.testing.assert_close(compiled(x), model(x), atol=2e-2, rtol=2e-2)
    store = tuner.weights
    for layer in model.layers:
        kinds = {
            k for (k, ident), held in store._entries.items() if ident[0] == id(layer.weight) and held.value is not None
        }
        assert len(kinds) <= 1, kinds
    winners = {r["kernel"] for r in ft.tactics()}
    held_kinds = {kind for (kind, _), held in store._entries.items() if held.value is not None}
    assert held_kinds <= {"blocked2", "blocked4", "blocked2p", "blocked4p", "fp32", "mkldnn_packed", "t_contiguous"}
    if not winners & {"cpu_blocked", "cpu_linear"}:
        assert not held_kinds  # no winner reads a copy: tuning left none


class SleepsWithCopy(ft.TunableRunner):
    """A candidate that would read a weight copy (it claims one) and takes ``seconds`` per call."""

    def __init__(self, name: str, seconds: float) -> None:
        self.name, self.seconds = name, seconds

    def copy_kind(self, tactic):
        return "packed"

    def forward(self, inputs, tactic=-1):
        time.sleep(self.seconds)
        return torch.mm(inputs[0], inputs[1])


def test_a_copy_must_save_enough_to_be_worth_its_memory(tuner):
    """Against a default of 3 ms, a copy tactic 10% faster loses (it would hold the weight twice for
    little), while one 3x faster wins and names the default as the fallback for refused copies."""
    cfg = ft.TuningConfig(dynamic=(ft.DynamicDim(input_idx=0, dim_idx=0),))
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    slow_default = MMSlow(seconds=3e-3)
    runner, _ = tuner.choose_one("a", (slow_default, SleepsWithCopy("copy_small_gain", 2.7e-3)), cfg, (x, w))
    assert runner is slow_default
    runner, _ = tuner.choose_one("b", (slow_default, SleepsWithCopy("copy_big_gain", 1e-3)), cfg, (x, w))
    assert runner.name == "copy_big_gain"
    (big,) = [r for r in ft.tactics() if r["op"] == "b"]
    assert big["fallback"] == "mm_slow" and big["fallback_s"] >= 2e-3


class SleepsOnItsCopy(ft.TunableRunner):
    """A candidate that reads its own kind of copy of the weight (made through the tuner's store, as
    the CPU runners make theirs) and takes ``seconds`` per call; it notes the most bytes held."""

    def __init__(self, name: str, seconds: float, store: WeightCache, peak: list) -> None:
        self.name, self.seconds, self.store, self.peak = name, seconds, store, peak

    def copy_kind(self, tactic):
        return self.name

    def forward(self, inputs, tactic=-1):
        x, w = inputs
        copy = admitting(self.store, lambda: self.store.get(w, self.name, lambda t: t.t().contiguous(), w.numel() * 4))
        self.peak.append(self.store.nbytes)
        time.sleep(self.seconds)
        return torch.mm(x, copy.t())


def test_a_candidate_whose_copy_fits_only_alone_is_timed_in_a_later_round(tuner):
    """The budget holds one copy: the first candidate's copy fills it, the second's (the fastest)
    is postponed, timed once the first's is dropped, and wins; the trial never held two."""
    store = tuner.weights
    w = nn.Parameter(torch.randn(64, 64), requires_grad=False)
    store.max_bytes = int(1.5 * w.numel() * 4)
    cfg = ft.TuningConfig(dynamic=(ft.DynamicDim(input_idx=0, dim_idx=0),))
    x, peak = torch.randn(4, 64), []
    candidates = (
        MMSlow(seconds=4e-3),
        SleepsOnItsCopy("first", 3e-3, store, peak),
        SleepsOnItsCopy("fast", 5e-4, store, peak),
    )
    runner, _ = tuner.choose_one("postponed", candidates, cfg, (x, w))
    assert runner.name == "fast"
    (entry,) = [r for r in ft.tactics() if r["op"] == "postponed"]
    assert not entry["rejected"] and entry["timed"] == 3
    assert max(peak) <= store.max_bytes and store.nbytes == 0  # one copy at a time; none left after


def test_every_graph_over_a_weight_is_tuned_to_read_one_kind_of_copy(tuner):
    """Dynamo compiles T = 1 apart from the dynamic graph, so one weight is tuned under two shape
    keys. Once the first key's winner reads copies of kind "a" (none made yet: copies wait for
    their weight's calls), the second key's candidates reading another kind are left out, though
    one is faster: a weight holds one copy, and a winner reading another kind would be refused its
    copy and run its fallback for good (found on gpt-fast's MoE in fp32: 0.85x at T = 4 and 16)."""
    store = tuner.weights
    w = nn.Parameter(torch.randn(64, 64), requires_grad=False)
    cfg = ft.TuningConfig(dynamic=(ft.DynamicDim(input_idx=0, dim_idx=0),))
    peak, slow = [], MMSlow(seconds=2e-2)  # far apart: a loaded machine oversleeps by milliseconds
    a, b = SleepsOnItsCopy("a", 5e-3, store, peak), SleepsOnItsCopy("b", 5e-4, store, peak)
    runner, _ = tuner.choose_one("one_row", (slow, a), cfg, (torch.randn(1, 64), w))
    assert runner.name == "a" and store.nbytes == 0
    runner, _ = tuner.choose_one("rows", (slow, a, b), cfg, (torch.randn(4, 64), w))
    assert runner.name != "b"
    (entry,) = [r for r in ft.tactics() if r["op"] == "rows"]
    assert any("read another copy than this shape's a" in why for why in entry["rejected"])
    other = nn.Parameter(torch.randn(64, 64), requires_grad=False)  # another weight is free to choose
    tuner.choose_one("other", (slow, a, b), cfg, (torch.randn(4, 64), other))
    (entry,) = [r for r in ft.tactics() if r["op"] == "other"]
    assert not entry["rejected"] and entry["timed"] == 3
    with pytest.raises(ValueError, match="'a' is listed first"):  # the default must run without a copy
        tuner.choose_one("copy_first", (a, b), cfg, (torch.randn(4, 64), other))


def test_an_moe_layers_copies_wait_once_then_are_made_together(tuner):
    """The blocked MoE kernel reads two copies (gate/up packed together, and down): the layer runs
    its fallback for the first promote_after - 1 calls, then one call makes both, and from then on
    every call runs the kernel. (Each copy waiting for its own calls doubled the wait; a benchmark
    of a few calls measured only the fallback.)"""
    from moe_spellings import GptFastMoE

    load_blocked_gemm()
    torch._dynamo.reset()
    model = GptFastMoE(4, 2, 32, 16, torch.float32).requires_grad_(False)
    compiled = torch.compile(
        model, backend="flashtune", dynamic=True, options={"inner": "eager", "kernels": {"aten", "cpu"}, "ops": {"moe"}}
    )
    x = torch.randn(3, 32)
    store = tuner.weights
    with torch.no_grad():
        want = model(x)
        compiled(x)  # tunes the one bucket
        (key,) = tuner.cache.snapshot()  # the one bucket tuned
        forced = Entry("cpu_blocked_moe", (2, 0), 1e-6, 1e-5)
        forced.fallback_runner, forced.fallback_tactic, forced.fallback_s = "aten_moe", -1, 1e-5
        tuner.cache.put(key, forced)
        torch._dynamo.reset()  # the sites' memos forget the tuned winner
        compiled = torch.compile(
            model,
            backend="flashtune",
            dynamic=True,
            options={"inner": "eager", "kernels": {"aten", "cpu"}, "ops": {"moe"}},
        )
        store.clear()
        ft.reset_stats()
        made, left = store.made, store.fallback_calls
        for _ in range(store.promote_after - 1):
            torch.testing.assert_close(compiled(x), want, atol=1e-5, rtol=1e-5)
        assert store.made == made and store.fallback_calls - left == store.promote_after - 1
        for _ in range(3):
            torch.testing.assert_close(compiled(x), want, atol=1e-5, rtol=1e-5)
    assert store.made - made == 2  # gate/up and down, on the same call
    assert {kind for (kind, _), held in store._entries.items() if held.value is not None} == {"moe_blocked2"}
    assert ft.stats()["weight_copy_fallback_calls"] == store.fallback_calls
