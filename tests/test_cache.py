"""The on-disk tactic cache: write-through, merge across processes, survive bad files."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import MMChunked, MMDefault, mm_config

import flashtune_compile as ft
from flashtune_compile.tuner.cache import env_id

HERE = Path(__file__).parent


def run_worker(cache_dir, op, sizes, background=False):
    env = {**os.environ, "FLASHTUNE_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, str(HERE / "tune_worker.py"), op, *map(str, sizes)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if background:
        return proc
    return finish(proc)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def cache_file(cache_dir) -> Path:
    (path,) = Path(cache_dir).glob("tactics-*.json")
    return path


def tune(tuner, sizes, op="mm"):
    runners, cfg = (MMDefault(), MMChunked()), mm_config(buckets="pow2")
    w = torch.randn(16, 16)
    return [tuner.choose_one(op, runners, cfg, (torch.randn(n, 16), w)) for n in sizes]


def test_winners_are_written_through_and_a_second_process_profiles_nothing(cache_dir):
    first = run_worker(cache_dir, "mm", [1, 3, 5, 9, 17])
    assert first["stats"]["misses"] == 5 and first["stats"]["profiles"] > 0
    doc = json.loads(cache_file(cache_dir).read_text())
    assert len(doc["entries"]) == 5 and doc["env"]["torch"] == torch.__version__
    second = run_worker(cache_dir, "mm", [1, 3, 5, 9, 17, 4, 30])  # 4, 30: tuned buckets
    s = second["stats"]
    assert (s["profiles"], s["synthesized"], s["misses"], s["hits"]) == (0, 0, 0, 7)
    assert second["choices"][:5] == first["choices"]


def test_two_processes_writing_one_directory_lose_no_entries(cache_dir):
    sizes = [1] + [2**k + 1 for k in range(12)]  # 13 distinct pow2 buckets, each a write
    a = run_worker(cache_dir, "mm_a", sizes, background=True)
    b = run_worker(cache_dir, "mm_b", sizes, background=True)
    ra, rb = finish(a), finish(b)
    assert ra["stats"]["misses"] == rb["stats"]["misses"] == 13
    doc = json.loads(cache_file(cache_dir).read_text())
    ops = sorted(e["op"] for e in doc["entries"])
    assert ops.count("mm_a") == ops.count("mm_b") == 13


@pytest.mark.parametrize(
    "content", ['{"format": 1, "entries": [', "\x00\xff garbage", "[]", '{"format": 99, "env": {}, "entries": []}']
)
def test_corrupt_or_foreign_file_is_set_aside_with_one_warning(tuner, cache_dir, caplog, content):
    cache_dir.mkdir(parents=True)
    path = cache_dir / f"tactics-{env_id(tuner.cache.env)}.json"
    path.write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="flashtune"):
        tune(tuner, [3, 5, 9])
    assert caplog.text.count("set aside") == 1
    assert len(list(cache_dir.glob("*.bad-*"))) == 1
    assert len(json.loads(path.read_text())["entries"]) == 3


def test_file_from_another_environment_is_set_aside(tuner, cache_dir, caplog):
    tune(tuner, [3])
    path = cache_file(cache_dir)
    doc = json.loads(path.read_text())
    doc["env"]["torch"] = "1.0.0"
    path.write_text(json.dumps(doc))
    fresh = ft.AutoTuner(settings=tuner.settings)
    with caplog.at_level(logging.WARNING, logger="flashtune"):
        tune(fresh, [3])
    assert "another environment" in caplog.text and "'torch': ('1.0.0'" in caplog.text
    assert fresh.stats.misses == 1


def test_unknown_runner_and_ill_typed_tactic_entries_are_dropped(tuner, cache_dir, caplog):
    tune(tuner, [3, 5])
    path = cache_file(cache_dir)
    doc = json.loads(path.read_text())
    doc["entries"][0]["runner"] = "os.system"
    doc["entries"][1]["tactic"] = {"__class__": "subprocess.Popen"}
    path.write_text(json.dumps(doc))
    fresh = ft.AutoTuner(settings=tuner.settings)
    with caplog.at_level(logging.WARNING, logger="flashtune"):
        tune(fresh, [3, 5])
    assert "unknown runner 'os.system'" in caplog.text and "a tactic must be" in caplog.text
    assert fresh.stats.misses == 2  # both re-tuned, nothing executed


def test_cached_tactic_the_runner_no_longer_offers_is_dropped(tuner, cache_dir, caplog):
    tune(tuner, [7])
    path = cache_file(cache_dir)
    doc = json.loads(path.read_text())
    doc["entries"][0].update(runner="mm_chunked", tactic=3)  # MMChunked offers 1, 2, 4 only
    path.write_text(json.dumps(doc))
    fresh = ft.AutoTuner(settings=tuner.settings)
    with caplog.at_level(logging.WARNING, logger="flashtune"):
        ((runner, tactic),) = tune(fresh, [7])
    assert "not offered" in caplog.text
    assert tactic != 3 and fresh.stats.misses == 1


def _buckets_on_disk(cache_dir):
    return sorted(tuple(e["bucket"]) for e in json.loads(cache_file(cache_dir).read_text())["entries"])


def test_a_dropped_stale_entry_stays_dropped_across_writes_and_reloads(tuner, cache_dir, caplog):
    tune(tuner, [7, 2])  # buckets 8 and 2
    path = cache_file(cache_dir)
    doc = json.loads(path.read_text())
    (stale,) = [e for e in doc["entries"] if e["bucket"] == [8]]
    stale.update(runner="mm_chunked", tactic=3)  # MMChunked offers 1, 2, 4 only
    path.write_text(json.dumps(doc))
    off = ft.AutoTuner(tune="off", settings=tuner.settings)
    with caplog.at_level(logging.WARNING, logger="flashtune"):
        ((runner, tactic),) = tune(off, [7])
    assert (runner.name, tactic) == ("mm", -1) and caplog.text.count("not offered") == 1
    assert _buckets_on_disk(cache_dir) == [(2,)]  # the drop was written through
    with ft.autotune():
        tune(off, [20])  # another winner written through: the stale entry must not come back from memory
    assert _buckets_on_disk(cache_dir) == [(2,), (32,)]
    caplog.clear()
    reloaded = ft.AutoTuner(tune="off", settings=tuner.settings)
    with caplog.at_level(logging.WARNING, logger="flashtune"):
        tune(reloaded, [7, 7])
    assert "not offered" not in caplog.text and reloaded.stats.fallbacks == 2


def test_an_entry_dropped_in_memory_is_not_merged_back_from_an_older_copy_on_disk(tmp_path):
    from flashtune_compile.tuner.cache import Entry, TacticCache, write_document

    env = {"test": 1}
    key, other = ("op", ("r",), (), (), (8,)), ("op", ("r",), (), (), (16,))
    old = Entry("r", -1, 1.0, 1.0, created=100.0)
    cache = TacticCache(tmp_path, env)
    cache.merge_in({key: old})
    cache.drop(key)
    write_document(cache.path, env, {key: old})  # another process writes its (older) copy back
    cache.put(other, Entry("r", -1, 1.0, 1.0))  # this write merges the disk into memory
    assert cache.get(key) is None and set(TacticCache(tmp_path, env).snapshot()) == {other}
    newer = Entry("r", -1, 0.5, 1.0, created=200.0)  # a re-tuned entry is taken
    write_document(cache.path, env, {key: newer, other: cache.get(other)})
    cache.put(("op", ("r",), (), (), (32,)), Entry("r", -1, 1.0, 1.0))
    assert cache.get(key) == newer


def test_save_clear_load_round_trip(tuner, tmp_path):
    chosen = tune(tuner, [1, 2, 3, 5])
    assert ft.save_cache(tmp_path / "saved.json") == 4
    ft.clear_cache()
    assert ft.tactics() == [] and not list(tuner.cache.directory.glob("tactics-*.json"))
    assert ft.load_cache(tmp_path / "saved.json") == 4
    ft.reset_stats()
    assert [(r.name, t) for r, t in tune(tuner, [1, 2, 3, 5])] == [(r.name, t) for r, t in chosen]
    assert ft.stats()["profiles"] == 0 and ft.stats()["hits"] == 4


def test_load_cache_refuses_another_environment(tuner, tmp_path):
    tune(tuner, [3])
    ft.save_cache(tmp_path / "saved.json")
    doc = json.loads((tmp_path / "saved.json").read_text())
    doc["env"]["gpu"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "foreign.json").write_text(json.dumps(doc))
    with pytest.raises(ft.CacheFileError, match="another environment.*gpu"):
        ft.load_cache(tmp_path / "foreign.json")


def test_unwritable_cache_dir_costs_persistence_not_the_program(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tuner = ft.AutoTuner(cache_dir=blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="flashtune"):
        tune(tuner, [3, 3])
    assert tuner.stats.misses == 1 and tuner.stats.hits == 1
    assert "tuning in memory only" in caplog.text


def test_memory_only_cache(tmp_path):
    tuner = ft.AutoTuner(cache_dir=None)
    tune(tuner, [3])
    assert tuner.cache.path is None and len(tuner.tactics()) == 1


def test_files_get_the_umasks_mode_and_importing_never_changes_the_umask(tmp_path):
    """Cache documents are made as open() makes files (0o666 less the umask), without flashtune ever
    calling os.umask (a process-wide setting: swapping it races with other threads)."""
    code = """if True:
        import json, os, sys
        os.umask(0o027)
        calls, real = [], os.umask
        os.umask = lambda mask: calls.append(mask) or real(mask)
        import flashtune_compile as ft
        from flashtune_compile.tuner.cache import Entry, TacticCache
        cache = TacticCache(sys.argv[1], {"test": 1})
        cache.put(("op", ("r",), (), (), (8,)), Entry("r", -1, 1.0, 1.0))
        print(json.dumps([calls, os.stat(cache.path).st_mode & 0o777]))
        """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    calls, mode = json.loads(out.stdout.strip().splitlines()[-1])
    assert calls == [] and mode == 0o640
