"""Offline artifacts: one file carries tactics and Inductor's compile artifacts into a fresh process."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import flashtune_compile as ft
from flashtune_compile import artifacts

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _worker(mode, path, tmp_path):
    env = {
        **os.environ,
        "FLASHTUNE_CACHE_DIR": str(tmp_path / f"{mode}-tactics"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"{mode}-inductor"),
    }
    env.pop("FLASHTUNE_TUNE", None)
    out = subprocess.run(
        [sys.executable, str(HERE / "artifact_worker.py"), mode, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_artifacts_round_trip_into_a_fresh_process_that_profiles_and_recompiles_nothing(tmp_path):
    path = tmp_path / "model.ftart"
    made = _worker("make", path, tmp_path)
    assert made["stats"]["profiles"] > 0 and made["tuned"] == 8  # 2 linears x (static 1, buckets 2, 4, 8)
    assert made["saved"]["tactics"] == 8 and made["saved"]["inductor"] >= 2
    assert made["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 2
    assert made["saved"]["libraries"] == len(made["built"]) >= 1  # the C++ kernels it compiled

    used = _worker("use", path, tmp_path)
    assert used["loaded"] == {
        "tactics": 8,
        "inductor": made["saved"]["inductor"],
        "libraries": made["saved"]["libraries"],
    }
    assert used["built"] == []  # no C++ compiler run: every kernel library came from the artifact
    s = used["stats"]
    assert s["profiles"] == 0 and s["synthesized"] == 0 and s["misses"] == 0 and used["tuned"] == 0
    assert s["compiles"] == made["stats"]["compiles"]  # the same graphs, no extra recompiles
    ind, aot = used["counters"]["inductor"], used["counters"]["aot_autograd"]
    assert ind.get("fxgraph_cache_miss", 0) == 0 and aot.get("autograd_cache_miss", 0) == 0
    assert ind.get("fxgraph_cache_hit", 0) + aot.get("autograd_cache_hit", 0) >= s["compiles"]


def _eager_artifact(tuner, path):
    """An artifact of an inner-eager model: tactics only. Inductor artifacts recorded by earlier
    tests in this process are cleared first (torch 2.11's dynamo.reset keeps them)."""
    from torch.compiler._cache import CacheArtifactManager

    CacheArtifactManager.clear()
    model = torch.nn.Linear(16, 8)
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"inner": "eager"})
    ft.warmup(compiled, lambda n: (torch.randn(n, 16),), num_tokens=[2, 4], progress=False)
    return ft.save_artifacts(path)


def _rewrite(src, dst, edit_manifest=None, extra=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "manifest.json" and edit_manifest:
                manifest = json.loads(data)
                edit_manifest(manifest)
                data = json.dumps(manifest).encode()
            zout.writestr(name, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)


def test_artifact_from_another_environment_is_refused_and_nothing_is_used(tuner, tmp_path, monkeypatch):
    saved = _eager_artifact(tuner, tmp_path / "a.ftart")
    assert saved["tactics"] == 2 and saved["inductor"] == 0  # inner="eager": tactics only

    def foreign(m):
        m["env"]["torch"] = "2.0.0+cu118"
        m["env"]["gpu"] = "NVIDIA A100-SXM4-80GB"

    _rewrite(tmp_path / "a.ftart", tmp_path / "foreign.ftart", foreign, extra={"inductor.bin": b"\x00" * 64})
    calls = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: calls.append(blob))
    ft.clear_cache()
    with pytest.raises(ft.ArtifactError) as err:
        ft.load_artifacts(tmp_path / "foreign.ftart")
    msg = str(err.value)
    assert "another environment" in msg and "torch '2.0.0+cu118'" in msg and torch.__version__ in msg
    assert "gpu 'NVIDIA A100-SXM4-80GB'" in msg
    assert calls == [] and ft.tactics() == []  # neither half was used


@pytest.mark.parametrize("damage", ["truncated", "not_zip", "tactic_document", "missing", "new_version"])
def test_damaged_or_wrong_files_are_refused_with_a_clear_error(tuner, tmp_path, damage):
    good = tmp_path / "a.ftart"
    _eager_artifact(tuner, good)
    bad = tmp_path / "bad.ftart"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[:100])
    elif damage == "not_zip":
        bad.write_text("hello")
    elif damage == "tactic_document":
        ft.save_cache(bad)
    elif damage == "new_version":
        _rewrite(good, bad, lambda m: m.update(version=99))
    ft.clear_cache()
    expect = {
        "truncated": "not a readable flashtune artifact",
        "not_zip": "not a readable flashtune artifact",
        "tactic_document": "ft.load_cache",
        "missing": "no such artifact file",
        "new_version": "format version 99",
    }[damage]
    with pytest.raises(ft.ArtifactError, match=expect):
        ft.load_artifacts(bad)
    assert ft.tactics() == []


def test_tactics_only_artifact_makes_a_fresh_tuner_profile_nothing(tuner, tmp_path):
    _eager_artifact(tuner, tmp_path / "a.ftart")
    assert artifacts.is_artifact(tmp_path / "a.ftart") and not artifacts.is_artifact(HERE / "conftest.py")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.ftart").stat().st_mode & 0o777 == 0o666 & ~umask  # shippable, not owner-only
    fresh = ft.AutoTuner(cache_dir=tmp_path / "elsewhere", settings=tuner.settings)
    ft.AutoTuner.reset(fresh)
    torch._dynamo.reset()
    assert ft.load_artifacts(tmp_path / "a.ftart") == {"tactics": 2, "inductor": 0, "libraries": 0}
    assert len(list((tmp_path / "elsewhere").glob("tactics-*.json"))) == 1  # written through to the new cache dir
    model = torch.nn.Linear(16, 8)
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"inner": "eager"})
    report = ft.warmup(compiled, lambda n: (torch.randn(n, 16),), num_tokens=[2, 3, 4], progress=False)
    assert report.tuned == 0 and ft.stats()["profiles"] == 0 and ft.stats()["hits"] == 3
