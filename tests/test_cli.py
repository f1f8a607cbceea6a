"""The `flashtune` console script, run against tactic caches tuned for real by backend="flashtune"."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import FAST
from PIL import Image

import flashtune_compile as ft
from flashtune_compile import cli
from flashtune_compile.tuner.cache import env_id, read_document, write_document

OPTIONS = {"inner": "eager", "kernels": ["aten", "cpu"]}
SHAPES = {"linear": "[*,16] [32,16] [32]", "mm": "[*,32] [32,16]"}


class MLP(nn.Module):
    """Two tunable ops: linear (Linear 16->32) and mm (relu(h) @ w, 32->16)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.w = nn.Parameter(torch.randn(32, 16) / 6, requires_grad=False)

    def forward(self, x):
        return torch.relu(self.up(x)) @ self.w


def _tune(sizes):
    torch._dynamo.reset()
    compiled = torch.compile(MLP(), backend="flashtune", dynamic=True, options=OPTIONS)
    with torch.no_grad():
        for n in sizes:
            compiled(torch.randn(n, 16))
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real tuning runs of MLP: run "a" on 1, 3, 8, 20 tokens (buckets 4, 8, 32 and the static
    call site of 1 token), run "b" later on 20 and 50 tokens (buckets 32 and 64). Each run's cache
    document is kept, with the tactic records the tuner reported."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHTUNE_CACHE_DIR", str(root / "cache"))
        mp.delenv("FLASHTUNE_TUNE", raising=False)
        t = ft.AutoTuner(settings=FAST)
        old = ft.AutoTuner.reset(t)
        try:
            for name, sizes in (("a", (1, 3, 8, 20)), ("b", (20, 50))):
                t.cache.clear(disk=True)
                _tune(sizes)
                doc = root / f"{name}.json"
                shutil.copy(t.cache.path, doc)
                out[name] = {"doc": doc, "records": t.tactics(), "env": t.cache.env}
        finally:
            ft.AutoTuner.reset(old)
    return out


@pytest.fixture
def cache(tuner, runs):
    """The `tuner` fixture's cache dir holding run "a"'s document as this environment's cache."""
    assert tuner.cache.env == runs["a"]["env"]
    tuner.cache.directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(runs["a"]["doc"], tuner.cache.path)
    return tuner.cache.path


def run(capsys, *argv):
    """cli.main in-process: (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def rows(stdout):
    """The body rows of every rich table printed, as lists of stripped cells."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]


def foreign(src, dest_dir, torch_version="9.9.9"):
    """A copy of document ``src`` whose environment claims another torch version."""
    doc = json.loads(src.read_text())
    doc["env"]["torch"] = torch_version
    dest = dest_dir / f"tactics-{env_id(doc['env'])}.json"
    dest.write_text(json.dumps(doc))
    return dest


def key_set(records):
    return {(r["op"], r["shape_key"], r["bucket"], r["kernel"]) for r in records}


def test_show_lists_every_tuned_bucket_with_its_kernel(capsys, cache, runs):
    rc, out, err = run(capsys, "cache", "show")
    assert rc == 0, err
    assert str(cache) in out and "(this environment)" in out and "torch " + torch.__version__ in out
    shown = {(r[0], r[1], r[3], r[4]) for r in rows(out)}
    expected = {
        (r["op"], cli._shapes(r["shape_key"]), cli._bucket(r["bucket"]), r["kernel"]) for r in runs["a"]["records"]
    }
    assert shown == expected and len(rows(out)) == len(runs["a"]["records"]) == 8
    for op, shape in SHAPES.items():
        assert {b for o, s, b, _ in shown if (o, s) == (op, shape)} == {"4", "8", "32"}
    assert any(o == "linear" and s == "[1,16] [32,16] [32]" and b == "static" for o, s, b, _ in shown)
    assert all(r[2] == "float32" for r in rows(out))


def test_show_op_filter_and_empty_cache(capsys, cache, tmp_path):
    rc, out, _ = run(capsys, "cache", "show", "--op", "mm")
    assert rc == 0 and {r[0] for r in rows(out)} == {"mm"} and len(rows(out)) == 4
    rc, out, _ = run(capsys, "cache", "show", "--op", "conv")
    assert rc == 0 and not rows(out) and "no entries for op 'conv'" in out
    rc, out, _ = run(capsys, "--cache-dir", tmp_path / "empty", "cache", "show")
    assert rc == 0 and out.strip() == f"no tactic cache documents in {tmp_path / 'empty'}"


def test_show_reports_unreadable_document_and_shows_the_rest(capsys, cache, runs):
    other = foreign(runs["a"]["doc"], cache.parent)
    bad = cache.parent / "tactics-0000000000000000.json"
    bad.write_text('{"format": 1, "entr')
    rc, out, err = run(capsys, "cache", "show")
    assert rc == 1
    assert err.startswith("flashtune: error: ") and str(bad) in err and "Traceback" not in err
    assert str(cache) in out and str(other) in out and "torch 9.9.9" in out
    assert out.count("(this environment)") == 1 and len(rows(out)) == 16
    rc, out, _ = run(capsys, "cache", "show", "--file", other)
    assert rc == 0 and "torch 9.9.9" in out and "(this environment)" not in out and len(rows(out)) == 8


def test_export_writes_one_loadable_document(capsys, cache, tuner, tmp_path):
    dest = tmp_path / "out" / "tactics.json"
    rc, out, err = run(capsys, "cache", "export", dest)
    assert rc == 0, err
    assert out.strip() == f"exported 8 entries to {dest}"
    assert len(read_document(dest, tuner.cache.env)) == 8


def test_import_into_empty_cache_dir_makes_entries_visible(capsys, runs, tuner, tmp_path):
    empty = tmp_path / "fresh"
    rc, out, err = run(capsys, "--cache-dir", empty, "cache", "import", runs["a"]["doc"])
    assert rc == 0, err
    assert "imported 8 entries" in out
    assert ft.AutoTuner.get() is tuner  # the command used a tuner of its own for that directory
    there = ft.AutoTuner(cache_dir=empty, settings=tuner.settings).cache
    assert len(read_document(there.path, tuner.cache.env)) == 8
    assert set(there.snapshot()) == set(read_document(runs["a"]["doc"], tuner.cache.env))


def test_import_of_foreign_environment_fails_and_changes_nothing(capsys, cache, runs, tuner, tmp_path):
    other = foreign(runs["b"]["doc"], tmp_path)
    before = cache.read_bytes()
    rc, out, err = run(capsys, "cache", "import", other)
    assert rc == 1 and not out
    assert err.startswith("flashtune: error: ") and "torch" in err and "9.9.9" in err and "Traceback" not in err
    assert cache.read_bytes() == before and list(cache.parent.glob("tactics-*.json")) == [cache]
    ft.AutoTuner.get().cache.get(next(iter(read_document(cache, None))))  # loads the document from disk
    assert key_set(ft.AutoTuner.get().tactics()) == key_set(runs["a"]["records"])
    rc, _, err = run(capsys, "cache", "import", tmp_path / "missing.json")
    assert rc == 1 and "no such file" in err


def test_merge_two_runs_gives_the_union_newer_wins(capsys, runs, tuner, tmp_path):
    a, b = read_document(runs["a"]["doc"], None), read_document(runs["b"]["doc"], None)
    shared = a.keys() & b.keys()
    assert shared and b.keys() - a.keys()  # bucket 32 tuned by both runs, bucket 64 only by "b"
    dest = tmp_path / "merged.json"
    rc, out, err = run(capsys, "cache", "merge", dest, runs["a"]["doc"], runs["b"]["doc"])
    assert rc == 0, err
    merged = read_document(dest, runs["a"]["env"])
    assert merged.keys() == a.keys() | b.keys()
    assert all(merged[k] == b[k] for k in shared)
    assert f"wrote {len(merged)} entries from 2 documents to {dest}" in out
    rc, out, _ = run(capsys, "cache", "merge", dest, runs["a"]["doc"])  # into an existing OUT
    assert rc == 0 and read_document(dest, None) == merged and "from 2 documents" in out


def test_merge_refuses_a_foreign_environment(capsys, runs, tuner, tmp_path):
    other = foreign(runs["b"]["doc"], tmp_path)
    dest = tmp_path / "merged.json"
    rc, _, err = run(capsys, "cache", "merge", dest, runs["a"]["doc"], other)
    assert rc == 1 and str(other) in err and "torch: 9.9.9 vs " + torch.__version__ in err
    assert not dest.exists()


def test_clear_removes_this_environment_then_all(capsys, cache, runs, tuner):
    other = foreign(runs["a"]["doc"], cache.parent)
    rc, out, _ = run(capsys, "cache", "clear")
    assert rc == 0 and f"removed {cache}" in out
    assert not cache.exists() and other.exists() and not ft.AutoTuner.get().tactics()
    rc, out, _ = run(capsys, "cache", "clear")
    assert rc == 0 and "nothing to remove" in out
    write_document(cache, tuner.cache.env, read_document(runs["a"]["doc"], None))
    (cache.parent / f"{cache.name}.lock").touch()
    rc, out, _ = run(capsys, "cache", "clear", "--all")
    assert rc == 0 and str(other) in out and str(cache) in out
    assert not list(cache.parent.glob("tactics-*"))
    rc, out, _ = run(capsys, "cache", "clear", "--all")
    assert rc == 0 and "nothing to remove" in out and not list(cache.parent.glob("tactics-*"))


def test_report_writes_a_png(capsys, cache, tmp_path):
    png = tmp_path / "report.png"
    rc, out, err = run(capsys, "report", "--png", png)
    assert rc == 0, err
    assert f"wrote {png}" in out and "skipped 2 static-shape entries" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200 and len(data) > 10_000
    with Image.open(png) as img:
        img.verify()


def test_report_without_bucketed_entries_fails_clearly(capsys, tuner, runs, tmp_path, monkeypatch):
    png = tmp_path / "report.png"
    rc, _, err = run(capsys, "report", "--png", png)
    assert rc == 1 and err.startswith("flashtune: error: no tactic cache to plot") and not png.exists()
    static_only = tmp_path / "static.json"
    entries = read_document(runs["a"]["doc"], None)
    write_document(static_only, runs["a"]["env"], {k: e for k, e in entries.items() if not k[4]})
    rc, _, err = run(capsys, "report", "--png", png, "--file", static_only)
    assert rc == 1 and "no bucketed entries" in err and not png.exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [report] extra were not installed
    rc, _, err = run(capsys, "report", "--png", png, "--file", runs["a"]["doc"])
    assert rc == 1 and "pip install 'flashtune_compile[report]'" in err


def test_version_and_usage_errors(capsys):
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and out.strip() == f"flashtune {ft.__version__}"
    rc, _, err = run(capsys, "cache")
    assert rc == 2 and "usage:" in err


def test_console_script_shows_the_cache(cache):
    script = os.path.join(os.path.dirname(sys.executable), "flashtune")
    if not os.path.exists(script):
        pytest.skip(f"console script not installed at {script}")
    env = {**os.environ, "FLASHTUNE_CACHE_DIR": str(cache.parent)}
    out = subprocess.run([script, "cache", "show"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(cache) in out.stdout
    assert {r[0] for r in rows(out.stdout)} == {"linear", "mm"}
    assert all(shape in out.stdout for shape in SHAPES.values())


def test_import_of_an_artifact_file_fills_the_cache_and_a_foreign_one_is_refused(capsys, tuner, tmp_path):
    torch._dynamo.reset()
    compiled = torch.compile(MLP(), backend="flashtune", dynamic=True, options=OPTIONS)
    ft.warmup(compiled, lambda n: (torch.randn(n, 16),), num_tokens=[4, 8], progress=False)
    torch._dynamo.reset()
    ft.save_artifacts(tmp_path / "mlp.ftart")
    records = key_set(ft.tactics())
    ft.clear_cache()

    rc, out, err = run(capsys, "--cache-dir", tmp_path / "fresh", "cache", "import", tmp_path / "mlp.ftart")
    assert rc == 0 and "imported 4 tactic entries" in out, err
    assert len(list((tmp_path / "fresh").glob("tactics-*.json"))) == 1
    assert key_set(ft.AutoTuner(cache_dir=tmp_path / "fresh").tactics()) == records

    import zipfile

    with zipfile.ZipFile(tmp_path / "mlp.ftart") as zin, zipfile.ZipFile(tmp_path / "other.ftart", "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == "manifest.json":
                manifest = json.loads(data)
                manifest["env"]["triton"] = "0.0.1"
                data = json.dumps(manifest).encode()
            zout.writestr(name, data)
    ft.clear_cache()
    rc, out, err = run(capsys, "cache", "import", tmp_path / "other.ftart")
    assert rc == 1 and "another environment" in err and "triton '0.0.1'" in err and ft.tactics() == []
