"""The GPU suite's CPU rehearsal: the same code path as on a GPU (tiny shapes, Triton interpreted),
so the script cannot rot between GPU windows."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["env", "bandwidth", "tests", "linear", "quantized", "moe", "e2e", "training", "host", "offline"]


def test_dry_run_writes_the_report_and_every_section_passes(tmp_path):
    out = tmp_path / "suite"
    env = {
        **os.environ,
        "FLASHTUNE_CACHE_DIR": str(tmp_path / "cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
    }
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    sections = results["sections"]
    assert list(sections) == SECTIONS
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(SECTIONS, "ok")
    assert results["meta"]["torch"] == __import__("torch").__version__ and results["meta"]["date"]
    assert sections["env"]["data"]["families"]["triton"] == "yes"
    assert sections["tests"]["data"]["counts"]["tests collected"] > 50
    assert sections["bandwidth"]["data"]["read_bytes_per_s"] > 0
    assert [r["m"] for r in sections["linear"]["data"]["linear"]] == [1, 16]
    assert all(r["read_bw_share"] > 0 for r in sections["linear"]["data"]["linear"])  # decode rows as shares
    quantized = sections["quantized"]["data"]["quantized"]
    assert {(r["bits"], r["m"]) for r in quantized} == {(8, 1), (4, 1)} and all(r["err"] < 1e-3 for r in quantized)
    host = sections["host"]["data"]["host_us"]
    assert set(host) == {
        "eager F.linear",
        "inductor",
        "flashtune",
        "Triton GEMM, bound launcher",
        "Triton GEMM, Triton's launcher",
    }
    assert all(us > 0 for us in host.values()) and sections["host"]["data"]["bound"]
    assert all(r["tuned_s"] > 0 and r["grouped_mm_s"] > 0 for r in sections["moe"]["data"]["moe"])
    assert all(r["read_bw_share"] > 0 for r in sections["moe"]["data"]["moe"] if r["t"] <= 16)
    blocks = sections["moe"]["data"]["moe_blocks"]  # whole blocks as written: the experts fused, output right
    assert {r["block"] for r in blocks} >= {"custom_combine"}
    assert all(r["routed"] == ["flashtune.moe.default"] and r["err"] < 2e-2 for r in blocks)
    assert not [n for s in sections.values() for n in s["notes"] if n.startswith("WRONG")]  # every kernel is right
    assert [row[0] for row in sections["e2e"]["data"]["setup"]] == ["eager", "inductor", "flashtune"]
    assert all(float(row[-1]) < 1e-3 for row in sections["e2e"]["data"]["setup"])  # compiled == eager
    training = sections["training"]["data"]["training"]  # each model and precision, its loss near eager's
    assert [(r["model"], r["precision"]) for r in training] == [("gpt2", "fp32"), ("gpt2", "bf16")]  # dry: one model
    assert all(r["loss_rel"]["flashtune"] < (1e-5 if r["precision"] == "fp32" else 2e-2) for r in training)
    offline = sections["offline"]["data"]
    assert offline["cold"]["tuned"] > 0 and offline["warm"]["timings"] == 0 and offline["warm"]["tuned"] == 0
    report = (out / "report.md").read_text()
    assert all(f"## {name}" in report for name in SECTIONS) and "| warm |" in report


def _suite():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    module = sys.modules["gpu_suite"] = importlib.util.module_from_spec(spec)  # dataclasses need it
    spec.loader.exec_module(module)
    return module


def test_a_failing_section_records_its_traceback_and_the_next_one_runs(tmp_path):
    suite = _suite()
    report = suite.Report(tmp_path, suite.TIERS["dry"])

    def broken(sec):
        sec.table("half done", ["a"], [[1]])
        raise RuntimeError("the CUDA extension failed to build")

    report.run("env", broken)
    report.run("linear", lambda sec: sec.note("ran after the failure"))
    results = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert results["env"]["status"] == "failed" and "the CUDA extension failed" in results["env"]["error"]
    assert results["linear"]["status"] == "ok" and results["linear"]["notes"] == ["ran after the failure"]
    md = (tmp_path / "report.md").read_text()
    assert "| env | failed |" in md and "RuntimeError: the CUDA extension failed to build" in md and "half done" in md


def test_bad_arguments_are_refused_before_anything_runs(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "benchmarks/gpu_suite.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )

    bad = run("--dry-run", "--out", str(tmp_path), "--only", "env,nope")
    assert bad.returncode == 2 and "unknown section(s) ['nope']" in bad.stderr
    if not __import__("torch").cuda.is_available():
        no_gpu = run("--out", str(tmp_path))
        assert no_gpu.returncode == 2 and "no CUDA device here" in no_gpu.stderr
    assert not (tmp_path / "results.json").exists()
