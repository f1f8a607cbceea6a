"""Tuning across ranks (``tuner/distributed.py``): real gloo jobs of 2 and 4 CPU processes
(``tests/distributed_worker.py``), each bounded by a timeout, so a hang fails the test."""

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
TACTICS = 4  # the worker's RankSkewed offers four tactics besides the default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario, world, out, timeout=300):
    """Run ``world`` ranks of ``scenario``; (exit codes, each rank's JSON or None, stderr tails).
    Fails the test if any rank is still running after ``timeout`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(WORKER)}
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, scenario, str(r), str(world), str(port), str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario} with {world} ranks hung past {timeout} s")
    results = []
    for r in range(world):
        path = out / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return [p.returncode for p in procs], results, [e[-3000:] for e in errs]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_agree_share_the_work_and_merge_replicas(tmp_path, world):
    codes, res, errs = launch("agree", world, tmp_path)
    assert codes == [0] * world, errs

    # (1) rank 0 warm, the others cold: nothing profiled anywhere, everyone adopts rank 0's winners
    assert res[0]["warm_before"] and all(not r["warm_before"] for r in res[1:])
    assert [r["tp_profiles"] for r in res] == [0] * world
    assert all(r["tp_winners"] == res[0]["warm_before"] for r in res)

    # (2) ranks tuning alone pick different winners; together, they pick one
    assert len({json.dumps(r["alone"]) for r in res}) == world
    assert all(r["together"] == res[0]["together"] and len(r["together"]) == 1 for r in res)
    assert len({json.dumps(r["together_choice"]) for r in res}) == 1
    # ... and each rank timed only its share: together, exactly what one rank alone would time
    shares = [r["together_profiles"] for r in res]
    assert sum(shares) == 1 + TACTICS and max(shares) <= -(-(1 + TACTICS) // world)

    # (3) data-parallel warmup: each rank ran and tuned only its share; every rank ends with all winners
    counts = [1, 2, 4, 8, 16, 32]
    assert [r["dp_counts"] for r in res] == [counts[i::world] for i in range(world)]
    assert all(r["dp_tuned"] == 2 * len(r["dp_counts"]) for r in res)  # two linears per count
    assert all(r["dp_winners"] == res[0]["dp_winners"] and len(r["dp_winners"]) == 2 * len(counts) for r in res)
    assert all(r["dp_merged"] == 2 * (len(counts) - len(r["dp_counts"])) for r in res)


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_that_raises_makes_every_rank_raise_clearly(tmp_path, world):
    codes, res, errs = launch("raise", world, tmp_path)
    assert codes == [0] * world, errs
    assert res[1]["error"] == "RuntimeError: rank 1's kernel broke"
    for r in [0, *range(2, world)]:
        assert res[r]["error"].startswith(
            "DistributedTuningError: flashtune: rank 1 failed while tuning rank_skewed_mm"
        )
        assert "rank 1's kernel broke" in res[r]["error"] and res[r]["seconds"] < 40


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_that_dies_makes_the_others_raise_within_the_timeout(tmp_path, world):
    codes, res, errs = launch("die", world, tmp_path)
    assert codes[1] == 3 and res[1] is None
    for r in [0, *range(2, world)]:
        assert codes[r] == 0, errs[r]
        assert res[r]["error"].startswith(f"DistributedTuningError: flashtune: not every rank of {list(range(world))}")
        assert res[r]["seconds"] < 40 + 15  # the worker's FLASHTUNE_DISTRIBUTED_TIMEOUT is 40 s


def test_mismatched_versions_are_named_before_any_tuning(tmp_path):
    import flashtune_compile as ft

    codes, res, errs = launch("version", 2, tmp_path)
    assert codes == [0, 0], errs
    named = f"cannot tune together: they differ in flashtune: rank 0 '{ft.__version__}', rank 1 '9.9.9'"
    for r in res:
        assert named in r["error"]


def test_without_a_process_group_nothing_coordinates_and_bad_settings_are_named(monkeypatch):
    import flashtune_compile as ft
    from flashtune_compile.backend import parse_options
    from flashtune_compile.tuner import distributed

    assert distributed.team() is None and distributed.resolve("lockstep") == "off"  # not initialized: off
    with pytest.raises(ValueError, match="option 'distributed' must be one of"):
        parse_options({"distributed": "sometimes"})
    assert parse_options({"distributed": "replicas"}).site_options().distributed == "replicas"
    monkeypatch.setenv("FLASHTUNE_DISTRIBUTED", "sometimes")
    with pytest.raises(ValueError, match="FLASHTUNE_DISTRIBUTED='sometimes'"):
        distributed.resolve()
    monkeypatch.setenv("FLASHTUNE_DISTRIBUTED_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FLASHTUNE_DISTRIBUTED_TIMEOUT='soon'"):
        distributed.timeout_s()
    with pytest.raises(ValueError, match="positive number of seconds"):
        ft.set_process_group(None, timeout=0)
