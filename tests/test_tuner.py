"""choose_one: cache first, profile once, never choose a wrong or raising candidate."""

import logging
import threading

import pytest
import torch
from helpers import MMChunked, MMDefault, MMRaising, MMSlow, MMWrong, mm_config
from torch.utils._python_dispatch import TorchDispatchMode

import flashtune_compile as ft


class CountOps(TorchDispatchMode):
    """Counts every ATen op dispatched inside (tensor creation, random fills, kernels)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_miss_synthesizes_and_hit_makes_nothing(tuner):
    runners, cfg = (MMDefault(), MMChunked()), mm_config(buckets="pow2")
    w = torch.randn(16, 8)
    x = torch.randn(3, 16)
    with CountOps() as miss_ops:
        runner, tactic = tuner.choose_one("mm", runners, cfg, (x, w))
        runner.forward((x, w), tactic)
    # profiling (random inputs for bucket 4, every timing) runs outside the caller's dispatch modes;
    # the call itself is seen
    assert miss_ops.ops and all("normal_" not in op for op in miss_ops.ops)
    assert ft.stats()["synthesized"] == 1 and ft.stats()["misses"] == 1
    xs = [torch.randn(n, 16) for n in (3, 4, 3)]  # same bucket (4), sizes at and inside it
    with CountOps() as hit_ops:
        for x in xs:
            tuner.choose_one("mm", runners, cfg, (x, w))
    assert hit_ops.ops == []  # no empty/random/fill op, no kernel at all
    s = ft.stats()
    assert (s["hits"], s["misses"], s["synthesized"]) == (3, 1, 1)


def test_miss_profiles_each_valid_tactic_once(tuner):
    chunked = MMChunked(tactics=(1, 2, 4, 64))
    runners, cfg = (MMDefault(), chunked), mm_config(buckets="pow2")
    w = torch.randn(32, 32)
    tuner.choose_one("mm", runners, cfg, (torch.randn(7, 32), w))  # bucket 8: tactics 1, 2, 4 apply
    assert ft.stats()["profiles"] == 4  # default + 3 chunk sizes
    assert chunked.profiled_rows == {8}
    for n in (5, 6, 7, 8):
        tuner.choose_one("mm", runners, cfg, (torch.randn(n, 32), w))
    assert ft.stats()["profiles"] == 4 and ft.stats()["misses"] == 1
    tuner.choose_one("mm", runners, cfg, (torch.randn(9, 32), w))  # bucket 16: tuned once more
    assert ft.stats()["profiles"] == 8 and ft.stats()["misses"] == 2


def test_wrong_and_raising_candidates_are_never_chosen(tuner, caplog):
    runners = (MMSlow(), MMWrong(), MMRaising())
    cfg = mm_config()
    w = torch.randn(64, 64)
    with caplog.at_level(logging.INFO, logger="flashtune"):
        runner, tactic = tuner.choose_one("mm", runners, cfg, (torch.randn(16, 64), w))
    assert runner.name == "mm_slow" and tactic == -1  # the only correct one, slow as it is
    (record,) = ft.tactics()
    reasons = " | ".join(record["rejected"])
    assert "mm_wrong" in reasons and "max error" in reasons
    assert "mm_raising[0]" in reasons and "unsupported shape" in reasons
    assert ft.stats()["rejected"] == 3
    assert "never choosing" in caplog.text


def test_size_inside_a_bucket_runs_correctly_with_the_buckets_tactic(tuner):
    chunked = MMChunked(tactics=(64, 128, 256))
    runners, cfg = (MMDefault(), chunked), mm_config(buckets="hybrid")
    w = torch.randn(32, 48)
    for n in (257, 300, 511, 512):  # all in hybrid bucket 512
        x = torch.randn(n, 32)
        runner, tactic = tuner.choose_one("mm", runners, cfg, (x, w))
        torch.testing.assert_close(runner.forward((x, w), tactic), x @ w)
    assert chunked.profiled_rows == {512}  # profiled at the bucket's upper end
    assert ft.stats()["misses"] == 1


def test_clearly_faster_candidate_wins_over_a_slow_default(tuner):
    """A default that sleeps 1 ms against a plain mm: the mm must be chosen (a broken timer or
    winner rule that always keeps the default fails here, unlike the test below)."""
    slow_default, fast = MMSlow(seconds=1e-3), MMDefault()
    runner, tactic = tuner.choose_one("mm", (slow_default, fast), mm_config(), (torch.randn(4, 8), torch.randn(8, 8)))
    assert (runner.name, tactic) == ("mm", -1)
    (record,) = ft.tactics()
    assert record["kernel"] == "mm" and record["speedup"] > 2 and record["default_s"] >= 1e-3


def test_a_timing_raised_to_a_floor_keeps_what_is_above_it():
    from flashtune_compile.tuner.profiler import Timing

    t = Timing.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t.at_least(0.5) is t
    raised = t.at_least(2.5)
    assert (raised.q25, raised.median, raised.q75) == (2.5, 3.0, 4.0)
    assert raised.samples == (2.5, 2.5, 3.0, 4.0, 5.0)


def test_winner_rule_without_timing():
    """pick_winner: the default (index 0) is replaced only by a candidate faster by more than
    min_gain at the median and by more than the noise (interquartile ranges apart); among those,
    the fastest median wins."""
    from flashtune_compile.tuner.profiler import Timing, pick_winner

    default = Timing(median=10.0, q25=9.5, q75=10.5)
    clear = Timing(median=8.0, q25=7.8, q75=8.2)
    clearer = Timing(median=6.0, q25=5.0, q75=9.0)  # fastest median, noisy, but still apart from the default
    noisy = Timing(median=5.0, q25=3.0, q75=9.6)  # faster median, but its range reaches the default's
    steady = Timing(median=10.0, q25=9.99, q75=10.01)
    marginal = Timing(median=9.9, q25=9.89, q75=9.91)  # apart from `steady`, but only 1% faster
    slower = Timing(median=12.0, q25=11.0, q75=13.0)
    assert pick_winner([default], 0.02) == 0
    assert pick_winner([default, slower], 0.02) == 0
    assert pick_winner([default, clear], 0.02) == 1
    assert pick_winner([default, noisy], 0.02) == 0
    assert pick_winner([steady, marginal], 0.02) == 0
    assert pick_winner([steady, marginal], 0.0) == 1
    assert pick_winner([default, clear, noisy, clearer], 0.02) == 3
    assert clear.clearly_faster_than(default, 0.02) and not default.clearly_faster_than(clear, 0.02)
    assert not noisy.clearly_faster_than(default, 0.02)
    assert Timing.of([3.0, 1.0, 2.0, 4.0, 5.0]) == Timing(3.0, 2.0, 4.0, samples=(3.0, 1.0, 2.0, 4.0, 5.0))


def test_slower_candidate_loses_to_default(tuner):
    runner, tactic = tuner.choose_one(
        "mm", (MMDefault(), MMSlow()), mm_config(), (torch.randn(4, 8), torch.randn(8, 8))
    )
    assert runner.name == "mm" and tactic == -1


def test_tune_off_returns_default_without_profiling_and_says_so_once(cache_dir, caplog):
    tuner = ft.AutoTuner(tune="off")
    runners, cfg = (MMDefault(), MMChunked()), mm_config()
    w = torch.randn(8, 8)
    with caplog.at_level(logging.INFO, logger="flashtune"):
        for _ in range(3):
            runner, tactic = tuner.choose_one("mm", runners, cfg, (torch.randn(5, 8), w))
            assert (runner.name, tactic) == ("mm", -1)
    s = tuner.stats_dict()
    assert (s["profiles"], s["synthesized"], s["misses"], s["fallbacks"]) == (0, 0, 3, 3)
    assert caplog.text.count("tuning is off") == 1
    with ft.autotune():
        tuner.choose_one("mm", runners, cfg, (torch.randn(5, 8), w))
    assert tuner.stats.profiles > 0
    profiles = tuner.stats.profiles
    tuner.choose_one("mm", runners, cfg, (torch.randn(5, 8), w))  # now a hit, even with tuning off
    assert tuner.stats.profiles == profiles and tuner.stats.hits == 1


def test_env_var_and_autotune_false(cache_dir, monkeypatch):
    monkeypatch.setenv("FLASHTUNE_TUNE", "off")
    assert ft.AutoTuner().tune_mode == "off"
    monkeypatch.setenv("FLASHTUNE_TUNE", "sometimes")
    with pytest.raises(ValueError, match="FLASHTUNE_TUNE"):
        ft.AutoTuner()
    monkeypatch.delenv("FLASHTUNE_TUNE")
    tuner = ft.AutoTuner()
    with ft.autotune(False):
        tuner.choose_one("mm", (MMDefault(), MMChunked()), mm_config(), (torch.randn(5, 8), torch.randn(8, 8)))
    assert tuner.stats.profiles == 0 and tuner.stats.fallbacks == 1


def test_two_threads_profile_an_unseen_bucket_once(tuner):
    runners, cfg = (MMDefault(), MMChunked()), mm_config()
    w = torch.randn(64, 64)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def call():
        try:
            barrier.wait()
            results.append(tuner.choose_one("mm", runners, cfg, (torch.randn(30, 64), w)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set((r.name, t) for r, t in results)) == 1
    assert tuner.stats.misses == 1 and tuner.stats.profiles == 4  # default + tactics 1, 2, 4
    assert tuner.stats.hits == 3


def test_tuning_leaves_the_users_random_stream_alone(tuner):
    x, w = torch.randn(3, 8), torch.randn(8, 8)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    tuner.choose_one("mm", (MMDefault(), MMChunked()), mm_config(), (x, w))  # synthesizes random rows
    assert tuner.stats.synthesized == 1
    assert torch.equal(torch.rand(4), expected)


def test_empty_call_takes_the_default(tuner):
    runner, tactic = tuner.choose_one(
        "mm", (MMDefault(), MMChunked()), mm_config(), (torch.randn(0, 8), torch.randn(8, 8))
    )
    assert (runner.name, tactic) == ("mm", -1) and tuner.stats.profiles == 0


def test_bad_arguments_get_clear_errors(tuner):
    cfg = ft.TuningConfig(dynamic=(ft.DynamicDim(input_idx=(0, 1), dim_idx=(0, 0)),))
    with pytest.raises(ValueError, match="share a dynamic axis"):
        tuner.choose_one("add", (MMDefault(),), cfg, (torch.randn(3, 4), torch.randn(5, 4)))
    with pytest.raises(ValueError, match="at least one runner"):
        tuner.choose_one("mm", (), mm_config(), (torch.randn(3, 4), torch.randn(4, 4)))
    with pytest.raises(ValueError, match="distinct"):
        tuner.choose_one("mm", (MMDefault(), MMDefault()), mm_config(), (torch.randn(3, 4), torch.randn(4, 4)))
    with pytest.raises(ValueError, match="unknown bucket ladder"):
        ft.DynamicDim(0, 0, buckets="fibonacci")


def test_round_by_round_wins_decide_what_overlapping_spreads_cannot():
    """Interleaved rounds pair up: a candidate that wins nearly every round by more than min_gain
    is clearly faster even when a load that came and went makes the spreads overlap; one that wins
    about half the rounds is not."""
    from flashtune_compile.tuner.profiler import Timing, pick_winner

    load = [1.0, 1.6, 1.1, 2.0, 1.0, 1.3, 1.9, 1.2, 1.0, 1.5, 1.7, 1.1]  # the machine's background, per round
    default = Timing.of([10.0 * x for x in load])
    steady_win = Timing.of([9.0 * x for x in load])  # 10% faster in every round
    coin_flip = Timing.of([10.0 * x * (0.85 if r % 2 else 1.1) for r, x in enumerate(load)])
    assert not (steady_win.q75 < default.q25)  # the spreads overlap ...
    assert steady_win.clearly_faster_than(default, 0.02)  # ... yet every round says it is faster
    assert not coin_flip.clearly_faster_than(default, 0.02)
    assert pick_winner([default, coin_flip, steady_win], 0.02) == 2
    few = Timing.of([9.0 * x for x in load[:5]])  # too few rounds to tell from chance
    assert not few.clearly_faster_than(Timing.of([10.0 * x for x in load[:5]]), 0.02)


def test_settling_measures_more_until_a_faster_candidate_is_clear():
    import time

    from flashtune_compile.tuner.profiler import ProfilerSettings, Timing, pick_winner, settle_cpu

    def slow():
        time.sleep(2e-3)

    def fast():
        time.sleep(1.4e-3)

    settings = ProfilerSettings(block_seconds=1e-3, settle_seconds=2.0, settle_rounds=4)
    overlapping = [Timing.of([2e-3, 1.5e-3, 2.2e-3]), Timing.of([1.6e-3, 2.1e-3, 1.5e-3])]  # 3 noisy rounds each
    assert pick_winner(overlapping, 0.02) == 0
    settled = settle_cpu([slow, fast], overlapping, 0.02, settings)
    assert len(settled[1].samples) > 3 and pick_winner(settled, 0.02) == 1
    same = settle_cpu([slow, slow], overlapping, 0.02, ProfilerSettings(block_seconds=1e-3, settle_seconds=0.3))
    assert pick_winner(same, 0.02) == 0  # never replaced on noise: equal candidates stay undecided


def test_cpu_timing_is_cold_by_default_one_call_per_sample_after_an_eviction():
    """A layer's weights come from memory in a model (the other layers' weights stream through the
    caches between its calls): by default each CPU sample is one call made after the last-level
    cache is evicted, not a block of back-to-back calls that find the weights cached."""
    import glob

    from flashtune_compile.tuner import profiler
    from flashtune_compile.tuner.profiler import ProfilerSettings, time_cpu

    calls = [0, 0]

    def counted(i):
        def fn():
            calls[i] += 1
            return torch.ones(4).sum()

        return fn

    assert ProfilerSettings().cold_l2
    cold = time_cpu([counted(0)], ProfilerSettings(rounds=7, min_rounds=7))
    assert len(cold[0].samples) == 7 and calls[0] == 7  # one call per sample, nothing run untimed
    warm = time_cpu([counted(1)], ProfilerSettings(rounds=7, min_rounds=7, cold_l2=False))
    assert len(warm[0].samples) == 7 and calls[1] > 7 * 10  # blocks of calls, sized to dwarf the timer
    llc = profiler.last_level_cache_bytes()
    listed = [open(path).read().strip() for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size")]
    if listed:  # Linux: the largest cache sysfs lists, e.g. "32768K"
        assert llc == max(int(size[:-1]) << {"K": 10, "M": 20}[size[-1]] for size in listed)
    assert profiler._eviction_buffer().numel() * 4 >= 1.5 * llc  # reading it pushes out the whole cache


def test_profiling_runs_outside_the_callers_dispatch_modes(tuner):
    """A graph's first call can run under a Python dispatch mode (AOTAutograd's custom-op analysis),
    which makes every ATen call several times slower, unevenly: candidates are timed without it."""
    seen = []

    class Recording(MMChunked):
        def forward(self, inputs, tactic=-1):
            seen.append(torch._C._len_torch_dispatch_stack())
            return super().forward(inputs, tactic)

    with CountOps():
        tuner.choose_one("mm", (MMDefault(), Recording()), mm_config(), (torch.randn(6, 16), torch.randn(16, 16)))
    assert seen and set(seen) == {0}
