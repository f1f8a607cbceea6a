"""Every GPU figure we claim, measured in one command: one short device window gives them all.

    python benchmarks/gpu_suite.py --out DIR [--tier quick|full]   # on an NVIDIA GPU
    python benchmarks/gpu_suite.py --dry-run --out DIR             # the same code, CPU, tiny shapes

Writes ``DIR/report.md`` (tables) and ``DIR/results.json`` (every figure, with versions, GPU and
date) after each section, so a run cut short still leaves what it measured. Sections, each
independent (one that fails records its traceback and the suite goes on), each within a time
budget of its tier (rows past the budget are skipped and said so):

- bandwidth: the device's own read bandwidth: a sum over a buffer far larger than L2, and a copy;
           every decode row of ``linear`` is then a share of the read figure.
- env:     versions, GPU, SM count; whether each kernel family loads (Triton compiles and runs, the
           CUDA extension builds, ``torch._grouped_mm`` runs), with seconds.
- tests:   the GPU tests (test_gpu, test_cuda_kernels, and the Triton kernel tests compiled for real):
           pass/fail counts and the failing tests' names.
- linear:  the tuned linear op (the kernel it chose, timed alone) vs cuBLAS (``F.linear``) over M x
           (N, K); the Triton GEMM's best tactic vs cuBLAS at 4096^3; the decode kernels (CUDA
           skinny and Triton skinny) at their best tactics vs cuBLAS at M <= 16; cold tuning
           seconds per bucket; at M <= 16 each row's bytes per second (weight + activations +
           output) as a share of the measured read bandwidth.
- quantized: ``flashtune.linear_wq`` tuned (its chosen kernel: Triton weight-only, ATen's int8
           kernel or dequantize + cuBLAS) on int8 (one scale per row) and int4 (groups of 128,
           zero points) weights vs bf16 cuBLAS on the same shapes at decode M, and vs ATen's own
           quantized kernels (``_weight_int8pack_mm``; ``_weight_int4pack_mm``, tinygemm, the kernel
           torchao's int4 layout runs) where they run; each row's quantized bytes per second as a
           share of the read bandwidth.
- moe:     ``flashtune.moe`` tuned vs the ``torch._grouped_mm`` formulation for Mixtral-8x7B and
           DeepSeek-V3 shaped experts, Zipf-skewed routing; at T <= 16 the picked experts'
           weights read per second as a share of the read bandwidth. Then whole MoE blocks as code
           bases write them (``tests/moe_spellings.py``: torchtitan 0.3.0's released layer, whose
           dispatch and combine stay as written, and a block with a custom combine op), bf16,
           compiled eager / Inductor / flashtune, ms per call, and what flashtune routed.
- e2e:     a Llama-3-8B-shaped decoder (a few layers) for prefill and decode under eager, Inductor
           (default, max-autotune-no-cudagraphs, reduce-overhead), flashtune and flashtune with CUDA
           graphs; compile + tune seconds of each; where a decode call's host time goes for Inductor
           and flashtune (enqueue time, torch.profiler's top ops, cProfile's top Python functions).
- training: training steps (forward, backward, AdamW) of ``bench_training.py``'s GPT-2-shaped model
           and Llama-shaped block, fp32 and bf16 autocast: ms per step for eager, Inductor (default,
           max-autotune-no-cudagraphs) and flashtune, each its own copy; the loss after four steps
           relative to eager's.
- host:    host microseconds per op, flashtune and Inductor side by side: one linear at M = 1
           compiled each way (and flashtune held to its Triton GEMM, so Triton's launch path is
           what is timed), enqueue time per call with no sync; and whether warm Triton calls reach
           bound launchers (``kernels/triton_launch.py``) without Triton's Python launcher.
- offline: a cold process (compile, ``ft.warmup``, save the artifact) vs a fresh warm process
           loading it: seconds to first output and to ready; timings run in the warm one (must be 0).

Timing: CUDA events through ``triton.testing.do_bench`` (median, L2 flushed before each repeat),
the timer the tuner itself uses; contenders of one row are timed back to back in one process.
``--dry-run`` runs on the CPU with the Triton interpreter (the test suite runs it, so the script
cannot rot between GPU windows); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before Triton is imported: its kernels then run on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FLASHTUNE_TRITON_ON_CPU", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# This checkout's package even where the install went to another interpreter (the H200 image's `pip`
# is not its `python3`'s: the first GPU run died on ModuleNotFoundError).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flashtune_compile as ft  # noqa: E402
from flashtune_compile.kernels import FAMILIES  # noqa: E402
from flashtune_compile.kernels.moe import moe_grouped, moe_loop  # noqa: E402
from flashtune_compile.kernels.quant import dequantize  # noqa: E402
from flashtune_compile.ops import routing  # noqa: E402
from flashtune_compile.ops.matmul import LINEAR, MM  # noqa: E402
from flashtune_compile.ops.moe import MOE  # noqa: E402
from flashtune_compile.ops.quantized import LINEAR_WQ  # noqa: E402
from flashtune_compile.ops.site import SiteOptions, site_of, site_string  # noqa: E402
from flashtune_compile.tuner.profiler import ProfilerSettings, time_candidates  # noqa: E402
from flashtune_compile.tuner.runner import BucketProfile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if "flashtune" not in torch._dynamo.list_backends(exclude_tags=()):  # run from a checkout, not installed
    torch._dynamo.register_backend(ft.backend, "flashtune")


# -- tiers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama:
    """Decoder shape: Llama-3-8B is dim 4096, 32 heads, 8 KV heads, FFN 14336, vocab 128256."""

    dim: int = 4096
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 14336
    vocab: int = 128256
    layers: int = 2


@dataclass(frozen=True)
class Training:
    """The training section's models (``bench_training.py``'s): a GPT-2-shaped model
    (vocab, width, layers, heads; batch x tokens) and a Llama-shaped block (hidden, intermediate,
    heads, layers; tokens)."""

    gpt2: tuple[int, int, int, int] = (32000, 1024, 4, 16)
    batch: tuple[int, int] = (8, 512)
    block: tuple[int, int, int, int] = (4096, 14336, 32, 2)
    block_tokens: int = 2048
    models: tuple[str, ...] = ("gpt2", "llama block")


@dataclass(frozen=True)
class Tier:
    name: str
    device: str
    dtype: torch.dtype
    budgets: dict[str, float]  # section -> seconds
    linear_m: tuple[int, ...]
    linear_nk: tuple[tuple[int, int], ...]
    square: int  # Triton best tactic vs cuBLAS at square^3
    skinny_m: tuple[int, ...]
    moe: tuple[tuple[str, int, int, int, int], ...]  # (name, E, k, H, I)
    moe_tokens: tuple[int, ...]
    moe_block: tuple[int, int, int, int]  # (E, k, H, I) of the whole blocks timed as written
    llama: Llama
    bandwidth_bytes: int  # the probe's buffer: far larger than the GPU's L2
    host_nk: tuple[int, int]  # the linear whose host time per call is measured
    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    offline_tokens: tuple[int, ...]
    training: Training = field(default_factory=lambda: Training())
    tests: tuple[str, ...] = ("tests/test_gpu.py", "tests/test_cuda_kernels.py")
    triton_tests: tuple[str, ...] = ("tests/test_kernels.py", "tests/test_triton_moe.py")
    settings: ProfilerSettings = field(default_factory=lambda: ProfilerSettings(cuda_warmup_ms=5, cuda_rep_ms=25))


NK = ((4096, 4096), (14336, 4096), (4096, 14336))
MOE_MODELS = (("Mixtral-8x7B", 8, 2, 4096, 14336), ("DeepSeek-V3", 256, 8, 7168, 2048))
TIERS = {
    "quick": Tier(
        "quick",
        "cuda",
        torch.bfloat16,
        dict(
            env=80, bandwidth=10, tests=70, linear=30, quantized=25, moe=30, e2e=130, training=50, host=25, offline=80
        ),
        linear_m=(1, 16, 256, 4096),
        linear_nk=NK[:2],
        square=4096,
        skinny_m=(1, 16),
        moe=MOE_MODELS,
        moe_tokens=(1, 64, 1024),
        moe_block=(8, 2, 1024, 2816),
        llama=Llama(layers=2),
        bandwidth_bytes=2 << 30,
        host_nk=(4096, 4096),
        prefill=(128, 2048),
        decode=(1, 8, 64),
        offline_tokens=(1, 64),
    ),
    "full": Tier(
        "full",
        "cuda",
        torch.bfloat16,
        dict(
            env=90,
            bandwidth=15,
            tests=150,
            linear=90,
            quantized=60,
            moe=110,
            e2e=200,
            training=120,
            host=40,
            offline=90,
        ),
        linear_m=(1, 8, 16, 64, 256, 1024, 4096),
        linear_nk=NK,
        square=4096,
        skinny_m=(1, 8, 16),
        moe=MOE_MODELS,
        moe_tokens=(1, 16, 64, 256, 1024, 4096),
        moe_block=(8, 2, 1024, 2816),
        llama=Llama(layers=4),
        bandwidth_bytes=4 << 30,
        host_nk=(4096, 4096),
        prefill=(128, 2048),
        decode=(1, 8, 64),
        offline_tokens=(1, 8, 64, 512),
    ),
    "dry": Tier(  # the CPU rehearsal: same code, tiny shapes, Triton interpreted
        "dry",
        "cpu",
        torch.float32,
        dict(
            env=60, bandwidth=20, tests=60, linear=60, quantized=60, moe=60, e2e=300, training=120, host=60, offline=90
        ),  # loaded CI
        linear_m=(1, 16),
        linear_nk=((32, 64),),
        square=32,
        skinny_m=(1,),
        moe=(("tiny", 4, 2, 32, 16),),
        moe_tokens=(1, 8),
        moe_block=(4, 2, 32, 16),
        llama=Llama(dim=64, heads=4, kv_heads=2, ffn=96, vocab=128, layers=1),
        bandwidth_bytes=64 << 20,
        host_nk=(32, 64),
        prefill=(8,),
        decode=(1, 2),
        offline_tokens=(1, 4),
        training=Training(gpt2=(64, 32, 1, 2), batch=(2, 8), block=(32, 48, 2, 1), block_tokens=8, models=("gpt2",)),
        settings=ProfilerSettings(block_seconds=2e-4, rounds=3, min_rounds=2, max_seconds=0.2, prune_after=2),
    ),
}


# -- the report -------------------------------------------------------------------------------


class Report:
    """Sections' tables and figures, written to DIR/report.md and DIR/results.json as they come."""

    def __init__(self, out: Path, tier: Tier) -> None:
        self.out, self.tier = out, tier
        self.meta = meta(tier)
        self.sections: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[Section], None]) -> None:
        sec = Section(name, time.perf_counter() + self.tier.budgets[name])
        self.sections[name] = sec.record
        say(f"== {name} (budget {self.tier.budgets[name]:.0f}s)")
        start = time.perf_counter()
        try:
            fn(sec)
            sec.record["status"] = "ok"
        except Exception:  # a failed section is reported, the suite goes on
            sec.record["status"] = "failed"
            sec.record["error"] = traceback.format_exc()
            say(sec.record["error"])
        sec.record["seconds"] = round(time.perf_counter() - start, 2)
        say(f"== {name}: {sec.record['status']} in {sec.record['seconds']:.1f}s")
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "sections": self.sections}
        (self.out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
        (self.out / "report.md").write_text(self.markdown())

    def markdown(self) -> str:
        m = self.meta
        lines = [
            f"# flashtune GPU suite ({m['tier']} tier)",
            "",
            f"{m['date']} · {m['gpu'] or 'no GPU'} ({m['sms']} SMs) · torch {m['torch']} · triton {m['triton']}"
            f" · CUDA {m['cuda']} · Python {m['python']} · flashtune {m['flashtune']}",
            "",
            "| section | status | seconds |",
            "| --- | --- | ---: |",
        ]
        lines += [f"| {n} | {s.get('status', 'running')} | {s.get('seconds', '')} |" for n, s in self.sections.items()]
        for name, sec in self.sections.items():
            lines += ["", f"## {name}", ""]
            for table in sec["tables"]:
                lines += [f"**{table['title']}**", "", "| " + " | ".join(table["header"]) + " |"]
                lines.append("| " + " | ".join("---" for _ in table["header"]) + " |")
                lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table["rows"]]
                lines.append("")
            lines += [f"- {note}" for note in sec["notes"]]
            if sec.get("error"):
                lines += ["", "```", sec["error"].rstrip(), "```"]
        return "\n".join(lines) + "\n"


@dataclass
class Section:
    """What one section records: tables (title, header, rows), notes, raw figures."""

    name: str
    deadline: float
    record: dict[str, Any] = field(default_factory=lambda: {"tables": [], "notes": [], "data": {}})

    def table(self, title: str, header: list[str], rows: list[list[Any]]) -> None:
        self.record["tables"].append({"title": title, "header": header, "rows": rows})

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        say(f"   note: {text}")

    def over_budget(self, what: str) -> bool:
        """True (and noted once per ``what``) once the section's budget is spent."""
        if time.perf_counter() < self.deadline:
            return False
        self.note(f"budget spent: skipped {what}")
        return True


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def say(text: str) -> None:
    print(text, flush=True)


def meta(tier: Tier) -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:
            return None

    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "tier": tier.name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "flashtune": ft.__version__,
        "transformers": version("transformers"),
        "numpy": version("numpy"),
        "gpu": props.name if props else None,
        "sms": props.multi_processor_count if props else None,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
        "cpu": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
        "host": platform.node(),
    }


# -- helpers ----------------------------------------------------------------------------------


def medians(tier: Tier, fns: list[Callable[[], Any]]) -> list[float]:
    """Median seconds per call of each fn (the tuner's own timer)."""
    for fn in fns:
        fn()
    times = time_candidates(fns, torch.device(tier.device), tier.settings)
    return [t.median if t is not None else math.nan for t in times]


def sync(tier: Tier) -> None:
    if tier.device == "cuda":
        torch.cuda.synchronize()


def tuned_site(spec: Any, inputs: tuple, token_positions: tuple, max_tokens: int = 8192) -> Any:
    """The process tuner's site for ``spec`` called with ``inputs`` (dims in ``token_positions``
    dynamic, as the backend would mark them), as a compiled graph's node would have it."""
    shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs]
    dtypes = [x.dtype if isinstance(x, torch.Tensor) else None for x in inputs]
    axes = ((token_positions, 1, max_tokens),)
    return site_of(site_string(spec, axes, shapes, dtypes, SiteOptions()))


def entry_for(op: str, bucket: int) -> Any:
    """The cached winner of ``op`` whose bucket starts with ``bucket`` (latest), or None."""
    found = [r for r in ft.tactics() if r["op"] == op and r["bucket"] and r["bucket"][0] == bucket]
    return found[-1] if found else None


def randn(*shape: int, tier: Tier, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=tier.device, dtype=tier.dtype) * scale


# -- sections ---------------------------------------------------------------------------------


def section_env(sec: Section, tier: Tier) -> None:
    rows = []
    device = torch.device(tier.device)
    x, w = randn(16, 64, tier=tier), randn(32, 64, tier=tier)
    for family in FAMILIES:
        start = time.perf_counter()
        try:
            status = _family_loads(family, device, x, w)
        except Exception as e:
            status = f"no: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rows.append([family, status, round(time.perf_counter() - start, 2)])
    sec.table("kernel families", ["family", "loads", "seconds"], rows)
    sec.record["data"]["families"] = {r[0]: r[1] for r in rows}


def _family_loads(family: str, device: torch.device, x: torch.Tensor, w: torch.Tensor) -> str:
    """'yes' when ``family`` builds and gives F.linear's answer here, else why not."""
    ref = F.linear(x.float(), w.float())
    if family == "aten":
        from flashtune_compile.kernels.experts import grouped_mm_available

        return f"yes (torch._grouped_mm: {'yes' if grouped_mm_available(device, x.dtype) else 'no'})"
    if family == "triton":
        from flashtune_compile.kernels.triton_runner import TritonGemmRunner

        runner = TritonGemmRunner.for_op(LINEAR)
        tactics = runner.get_valid_tactics((x, w, None), BucketProfile((16,), (x.shape, w.shape, None)))
        if not tactics:
            return "no: not offered for these tensors"
        out = runner.forward((x, w, None), tactics[0])
    elif family == "cuda":
        from flashtune_compile.kernels.cuda.runner import CudaSkinnyLinearRunner, applies

        if not applies(x, w, None):
            return "no: not offered for these tensors"
        out = CudaSkinnyLinearRunner().forward((x, w, None))
    else:  # cpu: re-laid-out weights for CPU tensors
        if device.type != "cpu":
            return "n/a (CPU tensors only)"
        return "yes"
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    return "yes"


def section_tests(sec: Section, tier: Tier, dry: bool) -> None:
    files = [*tier.tests, *tier.triton_tests]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLASHTUNE_TRITON_ON_CPU")}
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
        cmd += ["-k", NVCC_ONLY]
        if dry:
            cmd.append("--collect-only")  # the CPU rehearsal: the files import and their tests are found
        elif _has("xdist"):
            cmd += ["-n", "4"]
        budget = max(10.0, sec.deadline - time.perf_counter())
        say(f"   {' '.join(cmd[3:])}")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
            output, timed_out = proc.stdout + proc.stderr, False
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            timed_out = True
        counts = _outcomes(output)
        failing = _failing(junit)
    rows = [[k, v] for k, v in counts.items()]
    if timed_out:
        rows.append(["timed out after (s)", round(budget)])
    sec.table("GPU tests: " + " ".join(files), ["outcome", "count"], rows)
    if failing:
        sec.table("failing tests", ["test", "message"], [[n, m] for n, m in failing[:30]])
    sec.record["data"] = {"counts": counts, "failing": failing, "timed_out": timed_out, "output": output[-200_000:]}
    if not counts:
        raise RuntimeError(f"pytest printed no summary:\n{output[-2000:]}")


# Checks that nvcc compiles our sources on a machine without a GPU: the GPU machine builds them for
# real (the env section, and every test that runs the kernel), so the suite spends no time on them.
NVCC_ONLY = "not compiles_with_nvcc and not parses_with_torch_headers and not compile_as_load_inline"


def _outcomes(output: str) -> dict[str, int]:
    """Counts from pytest's summary line; from its progress characters when it was cut short."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|tests? collected)", output)}
    if counts:
        return counts
    marks = "".join(
        m for line in output.splitlines() if re.search(r"\[\s*\d+%\]\s*$", line) for m in line.split("[")[0]
    )
    names = {".": "passed", "F": "failed", "s": "skipped", "E": "errors", "x": "xfailed"}
    return {names[c]: marks.count(c) for c in names if marks.count(c)}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _failing(junit: Path) -> list[tuple[str, str]]:
    if not junit.exists():
        return []
    import xml.etree.ElementTree as ET

    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            name = f"{case.get('classname')}::{case.get('name')}"
            out.append((name, (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""))
    return out


def section_linear(sec: Section, tier: Tier, read_bw: float | None) -> None:
    """``read_bw``: the bandwidth section's read figure (bytes/s), None where it did not run."""
    rows, data = [], []
    for n, k in tier.linear_nk:
        w = randn(n, k, tier=tier, scale=k**-0.5)
        for m in tier.linear_m:
            if sec.over_budget(f"linear rows from M={m}, N={n}, K={k}"):
                break
            x = randn(m, k, tier=tier)
            site = tuned_site(LINEAR, (x, w, None), ((0, 0),))
            start = time.perf_counter()
            with ft.autotune():
                runner, tactic = site.choose((x, w, None))
            tune_s = time.perf_counter() - start
            err = rel_err(runner.forward((x, w, None), tactic), F.linear(x.double(), w.double()))
            t_cublas, t_tuned = medians(
                tier, [lambda x=x, w=w: F.linear(x, w), lambda r=runner, t=tactic, x=x, w=w: r.forward((x, w, None), t)]
            )
            kernel = f"{runner.name}[{tactic}]"
            moved = (n * k + m * k + m * n) * x.element_size()  # each byte read or written once
            share = moved / t_tuned / read_bw if m <= 16 and read_bw else None
            row = [m, n, k, t_cublas * 1e6, t_tuned * 1e6, t_cublas / t_tuned, _share(share), kernel]
            rows.append([*row, round(tune_s, 2), err])
            data.append(
                dict(m=m, n=n, k=k, cublas_s=t_cublas, tuned_s=t_tuned, kernel=kernel, tune_s=tune_s, err=err)
                | dict(bytes=moved, read_bw_share=share, cublas_read_bw_share=share and share * t_tuned / t_cublas)
            )
    header = ["M", "N", "K", "cuBLAS us", "tuned us", "tuned vs cuBLAS", "of read BW", "chosen kernel"]
    header += ["cold tune s", "rel err"]
    sec.table(f"linear, {_name(tier.dtype)}: tuned (its chosen kernel) vs F.linear", header, rows)
    small = [r["cublas_s"] / r["tuned_s"] for r in data if r["m"] <= 16]
    if small:
        sec.note(f"geomean tuned vs cuBLAS at M <= 16: {_geomean(small):.3f}x (aim >= 1.3x)")
    shares = [r["read_bw_share"] for r in data if r["read_bw_share"] is not None]
    if shares:
        sec.note(f"decode rows (M <= 16) at {min(shares):.0%}-{max(shares):.0%} of the read bandwidth (aim >= 80%)")
    if data:
        sec.note(f"worst row: {min(r['cublas_s'] / r['tuned_s'] for r in data):.3f}x (aim >= 0.98x)")
    _flag_errors(sec, data, tier)
    sec.record["data"]["linear"] = data
    if not sec.over_budget("the Triton square GEMM"):
        _triton_square(sec, tier)
    if not sec.over_budget("the decode kernels"):
        _skinny(sec, tier, read_bw)


def _share(x: float | None) -> str:
    return "" if x is None else f"{x:.0%}"


def section_bandwidth(sec: Section, tier: Tier) -> float:
    """The device's read bandwidth in bytes/s (a sum over ``tier.bandwidth_bytes``, larger than any
    L2, so every byte comes from memory), and a copy's (read + write) for comparison."""
    dtype = torch.bfloat16 if tier.device == "cuda" else torch.float32  # the CPU's bf16 sum is slow
    buf = torch.ones(tier.bandwidth_bytes // dtype.itemsize, device=tier.device, dtype=dtype)
    dst = torch.empty_like(buf)
    t_sum, t_copy = medians(tier, [lambda: buf.sum(dtype=torch.float32), lambda: dst.copy_(buf)])
    nbytes = buf.numel() * dtype.itemsize
    read, copy_bw = nbytes / t_sum, 2 * nbytes / t_copy
    gib = nbytes / 2**30
    rows = [["sum (read)", gib, t_sum * 1e3, read / 1e9], ["copy (read + write)", gib, t_copy * 1e3, copy_bw / 1e9]]
    sec.table("memory bandwidth (median over repeats)", ["probe", "GiB read", "ms", "GB/s"], rows)
    sec.record["data"].update(read_bytes_per_s=read, copy_bytes_per_s=copy_bw)
    return read


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: one number per row, recorded rather than asserted (a wrong
    kernel is a finding of the run, not a reason to lose the section's other rows)."""
    ref = ref.float()
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _max_rel_err(tier: Tier) -> float:
    """The largest ``rel_err`` a correct kernel of the tier's dtype may show."""
    return 2e-2 if tier.dtype != torch.float32 else 1e-3


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def best_tactic(tier: Tier, baseline: Callable[[], Any], runner: Any, inputs: tuple, tactics: list) -> tuple:
    """(baseline seconds, best tactic, its seconds): every tactic of ``runner`` timed with the baseline."""
    times = medians(tier, [baseline] + [lambda t=t: runner.forward(inputs, t) for t in tactics])
    best = min(range(len(tactics)), key=lambda i: times[i + 1])
    return times[0], tactics[best], times[best + 1]


def _triton_square(sec: Section, tier: Tier) -> None:
    """The tiled Triton GEMM and the persistent TMA GEMM (Hopper) at their best tactics vs torch.mm."""
    from flashtune_compile.kernels.triton_runner import TritonGemmRunner, TritonTmaRunner

    s = tier.square
    a, b = randn(s, s, tier=tier, scale=s**-0.5), randn(s, s, tier=tier)
    rows = []
    for label, runner in (("tiled", TritonGemmRunner.for_op(MM)), ("persistent TMA", TritonTmaRunner.for_op(MM))):
        tactics = runner.get_valid_tactics((a, b), BucketProfile((s,), (a.shape, b.shape)))
        if not tactics:
            rows.append([label, s, "not offered here", "", "", "", "", len(tactics), ""])
            continue
        start = time.perf_counter()
        runner.precompile((a, b), tactics)
        compile_s = time.perf_counter() - start
        base, tactic, best = best_tactic(tier, lambda: torch.mm(a, b), runner, (a, b), tactics)
        rows.append([label, s, base * 1e3, best * 1e3, base / best, str(tactic), 2 * s**3 / best / 1e12])
        rows[-1] += [len(tactics), round(compile_s, 2)]
        sec.note(f"Triton {label} best tactic vs cuBLAS at {s}^3: {base / best:.3f}x (aim >= 0.9x)")
    header = ["kernel", "M=N=K", "cuBLAS ms", "Triton ms", "vs cuBLAS", "best tactic", "TFLOP/s", "tactics"]
    header.append("compile s")
    sec.table("Triton GEMMs: best tactic vs torch.mm (compile: all tactics, in parallel)", header, rows)
    sec.record["data"]["triton_square"] = [dict(zip(header, row)) for row in rows]


def _skinny(sec: Section, tier: Tier, read_bw: float | None) -> None:
    """The decode kernels alone, each at its best tactic: the CUDA skinny kernel and the Triton
    skinny GEMM against F.linear, with each one's read rate as a share of the device's."""
    from flashtune_compile.kernels.cuda.runner import CudaSkinnyLinearRunner
    from flashtune_compile.kernels.triton_runner import TritonSkinnyRunner

    runners = (("CUDA skinny", CudaSkinnyLinearRunner()), ("Triton skinny", TritonSkinnyRunner.for_op(LINEAR)))
    rows, data = [], []
    for n, k in tier.linear_nk:
        w = randn(n, k, tier=tier, scale=k**-0.5)
        for m in tier.skinny_m:
            if sec.over_budget(f"decode kernel rows from M={m}, N={n}, K={k}"):
                break
            x = randn(m, k, tier=tier)
            moved = (n * k + m * k + m * n) * x.element_size()
            profile = BucketProfile((m,), (x.shape, w.shape, None))
            base = None
            for name, runner in runners:
                tactics = runner.get_valid_tactics((x, w, None), profile)
                if not tactics:
                    rows.append([m, n, k, name, "not offered here", "", "", "", ""])
                    continue
                base, tactic, best = best_tactic(tier, partial(F.linear, x, w), runner, (x, w, None), tactics)
                share = moved / best / read_bw if read_bw else None
                cublas_share = moved / base / read_bw if read_bw else None
                row = [m, n, k, name, base * 1e6, best * 1e6, base / best, _share(share), _share(cublas_share)]
                rows.append([*row, str(tactic)])
                data.append(dict(m=m, n=n, k=k, kernel=name, cublas_s=base, best_s=best, tactic=str(tactic)))
                data[-1]["share"] = share
    header = ["M", "N", "K", "kernel", "cuBLAS us", "kernel us", "vs cuBLAS", "of read BW", "cuBLAS of read BW"]
    sec.table("decode kernels: best tactic vs F.linear", [*header, "best tactic"], rows)
    for name, _ in runners:
        mine = [r for r in data if r["kernel"] == name]
        if mine:
            ratio = _geomean([r["cublas_s"] / r["best_s"] for r in mine])
            sec.note(f"{name}: geomean {ratio:.3f}x cuBLAS at M <= 16 (aim >= 1.3x)")
    sec.record["data"]["skinny"] = data


def quantized_weight(n: int, k: int, bits: int, tier: Tier) -> tuple:
    """``(q, scales, zeros, group_size)``: int8 with one scale per row, or int4 values (-8..7, one per
    byte) in groups of 128 with zero points, scales in the tier's dtype."""
    if bits == 8:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=tier.device)
        return q, (torch.rand(n, 1, device=tier.device) * 0.01).to(tier.dtype), None, k
    gs = min(128, k)
    groups = -(-k // gs)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=tier.device)
    zeros = torch.randint(-2, 3, (n, groups), device=tier.device).to(tier.dtype)
    return q, (torch.rand(n, groups, device=tier.device) * 0.02).to(tier.dtype), zeros, gs


def _aten_quantized(x: torch.Tensor, q, scales, zeros, gs: int, bits: int) -> Callable[[], Any] | str:
    """ATen's own kernel for this weight, bound to its inputs, or why there is none here."""
    try:
        if bits == 8:
            s = scales.view(-1).to(x.dtype)
            fn = partial(torch._weight_int8pack_mm, x, q, s)
        else:  # tinygemm: uint4 values two per byte, scales and zeros as [G, N, 2]; w = (u - 8) * s + zero
            if (
                x.device.type != "cuda"
                or x.dtype != torch.bfloat16
                or q.shape[1] % 1024
                or gs not in (32, 64, 128, 256)
            ):
                return "tinygemm needs CUDA, bf16 and K a multiple of 1024"
            u = (q.to(torch.int32) + 8).to(torch.uint8)
            packed = torch._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), 8)
            zero = -zeros.float() * scales.float()  # s * (q - z) = (u - 8) * s + (-z * s)
            sz = torch.stack([scales.float().t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            fn = partial(torch._weight_int4pack_mm, x, packed, gs, sz)
        fn()
        return fn
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def section_quantized(sec: Section, tier: Tier, read_bw: float | None) -> None:
    """``read_bw``: the bandwidth section's read figure; every row's quantized weight bytes (int4 at
    half a byte) per second as a share of it."""
    rows, data = [], []
    for n, k in tier.linear_nk:
        w16 = randn(n, k, tier=tier, scale=k**-0.5)
        for bits in (8, 4):
            q, scales, zeros, gs = quantized_weight(n, k, bits, tier)
            for m in tier.skinny_m:
                if sec.over_budget(f"quantized rows from M={m}, N={n}, K={k}, int{bits}"):
                    break
                x = randn(m, k, tier=tier)
                inputs = (x, q, scales, zeros, None, gs, bits)
                site = tuned_site(LINEAR_WQ, inputs, ((0, 0),))
                with ft.autotune():
                    runner, tactic = site.choose(inputs)
                w64 = dequantize(q, scales.double(), zeros.double() if zeros is not None else None, gs, torch.float64)
                err = rel_err(runner.forward(inputs, tactic), x.double() @ w64.t())
                aten = _aten_quantized(x, q, scales, zeros, gs, bits)
                fns = [partial(F.linear, x, w16), lambda r=runner, t=tactic, i=inputs: r.forward(i, t)]
                fns += [aten] if callable(aten) else []
                times = medians(tier, fns)
                t_bf16, t_tuned = times[0], times[1]
                t_aten = times[2] if callable(aten) else None
                nbytes = n * k * bits // 8 + scales.numel() * scales.element_size() * (2 if zeros is not None else 1)
                share = nbytes / t_tuned / read_bw if read_bw else None
                kernel = f"{runner.name}[{tactic}]"
                aten_cell = t_bf16 / t_aten if t_aten else aten
                rows.append(
                    [
                        m,
                        n,
                        k,
                        f"int{bits}",
                        t_bf16 * 1e6,
                        t_tuned * 1e6,
                        t_bf16 / t_tuned,
                        aten_cell,
                        _share(share),
                        kernel,
                        err,
                    ]
                )
                data.append(
                    dict(m=m, n=n, k=k, bits=bits, group_size=gs, bf16_s=t_bf16, tuned_s=t_tuned, err=err)
                    | dict(aten_s=t_aten, aten=None if t_aten else aten, kernel=kernel, read_bw_share=share)
                )
    header = ["M", "N", "K", "weights", "bf16 cuBLAS us", "tuned us", "tuned vs bf16", "ATen kernel vs bf16"]
    sec.table(
        "quantized linear: tuned linear_wq vs bf16 F.linear and ATen's quantized kernels",
        header + ["of read BW", "chosen kernel", "rel err"],
        rows,
    )
    for bits in (8, 4):
        mine = [r for r in data if r["bits"] == bits]
        if mine:
            sec.note(
                f"int{bits}: geomean {_geomean([r['bf16_s'] / r['tuned_s'] for r in mine]):.3f}x bf16 cuBLAS "
                f"at decode M (aim >= {1.7 if bits == 8 else 2.5}x)"
            )
    _flag_errors(sec, data, tier)
    sec.record["data"]["quantized"] = data


def zipf_routing(t: int, e: int, k: int, tier: Tier, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing as the tuner synthesizes it for ``moe_routing="zipf"`` (``ops/routing.py``): top-k
    distinct experts per token drawn with Zipf-skewed popularity, renormalized fp32 weights."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = routing.topk_ids("zipf", t, k, e, torch.int64, torch.device(tier.device), g)
    return routing.topk_weights(t, k, torch.float32, torch.device(tier.device), g), ids


def moe_reference(hidden, weights, ids, w1, w2, activation, w3=None) -> torch.Tensor:
    """The experts' loop in fp32, each expert's weights widened only while it runs (DeepSeek-V3's
    expert weights would take 45 GB in fp32 at once)."""
    mm1 = lambda e, x: F.linear(x, w1[e].float())  # noqa: E731
    mm2 = lambda e, x: F.linear(x, w2[e].float())  # noqa: E731
    return moe_loop(hidden, weights, ids, w1, w2, activation, compute_dtype=torch.float32, mm1=mm1, mm2=mm2)


def section_moe(sec: Section, tier: Tier, read_bw: float | None) -> None:
    """``read_bw``: the bandwidth section's read figure; rows with T <= 16 report the experts'
    weights they must read (each picked expert once) per second as a share of it."""
    rows, data = [], []
    for name, e, k, h, inter in tier.moe:
        w1 = randn(e, 2 * inter, h, tier=tier, scale=h**-0.5)
        w2 = randn(e, h, inter, tier=tier, scale=inter**-0.5)
        for t in tier.moe_tokens:
            if sec.over_budget(f"{name} from T={t}"):
                break
            hidden = randn(t, h, tier=tier)
            weights, ids = zipf_routing(t, e, k, tier)
            inputs = (hidden, weights, ids, w1, w2, "silu", None)
            site = tuned_site(MOE, inputs, ((0, 0), (1, 0), (2, 0)))
            start = time.perf_counter()
            with ft.autotune():
                runner, tactic = site.choose(inputs)
            tune_s = time.perf_counter() - start
            err = rel_err(runner.forward(inputs, tactic), moe_reference(*inputs))
            fns = [lambda inputs=inputs: moe_grouped(*inputs), lambda r=runner, tc=tactic, i=inputs: r.forward(i, tc)]
            base, tuned = medians(tier, fns)
            kernel = f"{runner.name}[{tactic}]"
            picked = int(torch.unique(ids[(ids >= 0) & (ids < e)]).numel())
            moved = picked * 3 * h * inter * hidden.element_size()
            share = moved / tuned / read_bw if t <= 16 and read_bw else None
            row = [name, t, base * 1e6, tuned * 1e6, base / tuned, _share(share), kernel]
            rows.append([*row, round(tune_s, 2), err])
            data.append(dict(model=name, t=t, grouped_mm_s=base, tuned_s=tuned, kernel=kernel, tune_s=tune_s, err=err))
            data[-1].update(picked_experts=picked, read_bw_share=share)
        del w1, w2
    header = ["model", "T", "torch._grouped_mm us", "flashtune.moe us", "speedup", "of read BW", "chosen kernel"]
    header += ["cold tune s", "rel err"]
    sec.table("MoE experts, Zipf routing: flashtune.moe (tuned) vs the torch._grouped_mm formulation", header, rows)
    small = [r["grouped_mm_s"] / r["tuned_s"] for r in data if r["t"] <= 64]
    if small:
        sec.note(f"geomean speedup at T <= 64: {_geomean(small):.2f}x (aim >= 1.5x)")
    _flag_errors(sec, data, tier)
    sec.record["data"]["moe"] = data
    _moe_blocks(sec, tier)


MOE_BLOCKS = ("torchtitan_release", "custom_combine")  # tests/moe_spellings.py


def _moe_blocks(sec: Section, tier: Tier) -> None:
    """Whole MoE blocks as code bases write them (router included), bf16, called on ``x [T, H]``:
    eager, Inductor and flashtune (MoE ops only, so the router's top-k is eager's) ms per call,
    flashtune over the best of the other two, its relative error, and the flashtune ops its graph holds."""
    sys.path.insert(0, str(ROOT / "tests"))
    from moe_spellings import SPELLINGS

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    e, k, h, inter = tier.moe_block
    rows, data = [], []
    for spelling in MOE_BLOCKS:
        try:
            block = SPELLINGS[spelling](e, k, h, inter, torch.bfloat16).to(tier.device).eval()
        except Exception as ex:  # torchtitan missing or not importable with this torch
            sec.note(f"{spelling}: not built here: {type(ex).__name__}: {ex}")
            continue
        routed: list[str] = []

        def counting(gm, example_inputs, routed=routed):
            fn = ft.backend(gm, example_inputs, options={"ops": {"moe"}})
            routed.extend(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("flashtune."))
            return fn

        fns = {
            "eager": block,
            "inductor": torch.compile(copy.deepcopy(block), backend="inductor", dynamic=True),
            "flashtune": torch.compile(copy.deepcopy(block), backend=counting, dynamic=True),
        }
        for t in tier.moe_tokens:
            if sec.over_budget(f"{spelling} blocks from T={t}"):
                break
            x = torch.randn(t, h, device=tier.device).bfloat16()
            with torch.no_grad(), ft.autotune():
                ref = block(x)
                err = rel_err(fns["flashtune"](x), ref)
                times = medians(tier, [lambda f=f, x=x: f(x) for f in fns.values()])
            ms = dict(zip(fns, (s * 1e3 for s in times)))
            gain = min(ms["eager"], ms["inductor"]) / ms["flashtune"]
            ops = ", ".join(sorted(set(routed))) or "none"
            rows.append([spelling, t, ms["eager"], ms["inductor"], ms["flashtune"], gain, ops, err])
            data.append(dict(block=spelling, t=t, ms=ms, gain=gain, routed=sorted(set(routed)), err=err))
        del block, fns
    header = ["block", "T", "eager ms", "inductor ms", "flashtune ms", "vs best", "flashtune ops", "rel err"]
    sec.table(f"MoE blocks as written (E, k, H, I = {tier.moe_block}, bf16): ms per call", header, rows)
    if data:
        sec.note(f"blocks: flashtune vs the best of eager/Inductor, geomean {_geomean([r['gain'] for r in data]):.2f}x")
    for row in data:
        if not row["err"] <= 2e-2:
            sec.note(f"WRONG: the {row['block']} block at T={row['t']} is off eager by {row['err']:.3g}")
    sec.record["data"]["moe_blocks"] = data


def _flag_errors(sec: Section, data: list[dict], tier: Tier) -> None:
    """A note for each row whose output is off the float64 reference by more than the dtype allows."""
    limit = _max_rel_err(tier)
    for row in data:
        if not row["err"] <= limit:
            sec.note(f"WRONG: {row['kernel']} at {row} is off by {row['err']:.3g} (> {limit})")


class Attention(nn.Module):
    def __init__(self, c: Llama) -> None:
        super().__init__()
        self.c, self.hd = c, c.dim // c.heads
        self.wqkv = nn.Linear(c.dim, (c.heads + 2 * c.kv_heads) * self.hd, bias=False)
        self.wo = nn.Linear(c.dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        c, hd = self.c, self.hd
        q, k, v = self.wqkv(x).split([c.heads * hd, c.kv_heads * hd, c.kv_heads * hd], dim=-1)
        q = q.view(b, t, c.heads, hd).transpose(1, 2)
        k, v = (
            z.view(b, t, c.kv_heads, hd).transpose(1, 2).repeat_interleave(c.heads // c.kv_heads, 1) for z in (k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, c.dim))


class Block(nn.Module):
    def __init__(self, c: Llama) -> None:
        super().__init__()
        self.n1, self.attn, self.n2 = nn.RMSNorm(c.dim), Attention(c), nn.RMSNorm(c.dim)
        self.w13 = nn.Linear(c.dim, 2 * c.ffn, bias=False)
        self.w2 = nn.Linear(c.ffn, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        g, u = self.w13(self.n2(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


class Decoder(nn.Module):
    """A Llama-3-shaped decoder: tokens [B, T] -> logits [B, T, vocab] (no KV cache)."""

    def __init__(self, c: Llama) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm, self.head = nn.RMSNorm(c.dim), nn.Linear(c.dim, c.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def decoder(tier: Tier, layers: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    c = tier.llama if layers is None else Llama(**{**asdict(tier.llama), "layers": layers})
    return Decoder(c).to(device=tier.device, dtype=tier.dtype).eval()


def contenders(tier: Tier) -> list[tuple[str, dict[str, Any] | None]]:
    """(name, torch.compile kwargs; None = eager). CUDA-graph modes only where there is CUDA."""
    out: list[tuple[str, dict[str, Any] | None]] = [
        ("eager", None),
        ("inductor", dict(backend="inductor")),
        ("flashtune", dict(backend="flashtune")),
    ]
    if tier.device == "cuda":
        out += [
            ("inductor reduce-overhead", dict(backend="inductor", mode="reduce-overhead")),
            ("flashtune + CUDA graphs", dict(backend="flashtune", mode="reduce-overhead")),
            ("inductor max-autotune-no-cudagraphs", dict(backend="inductor", mode="max-autotune-no-cudagraphs")),
        ]
    return out


def section_e2e(sec: Section, tier: Tier) -> None:
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    base = decoder(tier)
    shapes = [("prefill", 1, t) for t in tier.prefill] + [("decode", b, 1) for b in tier.decode]
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = {(b, t): torch.randint(0, tier.llama.vocab, (b, t), generator=g).to(tier.device) for _, b, t in shapes}
    with torch.no_grad():
        ref = {key: base(x).float() for key, x in tokens.items()}
    ready: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    setup_rows = []
    # Contenders are set up within 60% of the budget: the rest is kept for timing the ones set up.
    setup_deadline = time.perf_counter() + 0.6 * max(0.0, sec.deadline - time.perf_counter())
    for name, kwargs in contenders(tier):
        if time.perf_counter() > setup_deadline:
            sec.note(f"budget spent: skipped contender {name} and later ones")
            break
        model = copy.deepcopy(base)
        fn = model if kwargs is None else torch.compile(model, dynamic=True, **kwargs)
        before = ft.stats()
        start = time.perf_counter()
        worst = 0.0
        with torch.no_grad(), ft.autotune():
            for key, x in tokens.items():
                for _ in range(3):  # CUDA-graph modes warm up, then record, then replay
                    out = fn(x)
                worst = max(worst, (out.float() - ref[key]).abs().max().item() / ref[key].abs().max().item())
        sync(tier)
        after = ft.stats()
        tuning = [round(after["tuning_seconds"] - before["tuning_seconds"], 2), after["misses"] - before["misses"]]
        setup_rows.append([name, round(time.perf_counter() - start, 2), *tuning, f"{worst:.2e}"])
        ready[name] = fn
    sec.table(
        "compile + tune (first three calls of every shape)",
        ["contender", "compile + tune s", "of which tuning s", "buckets tuned", "max rel. err vs eager"],
        setup_rows,
    )
    names = list(ready)
    rows, data = [], []
    for phase, b, t in shapes:
        if sec.over_budget(f"timing from {phase} B={b} T={t}"):
            break
        x = tokens[(b, t)]
        with torch.no_grad():
            times = medians(tier, [lambda f=ready[n], x=x: f(x) for n in names])
        rows.append([phase, b, t, *(s * 1e3 for s in times)])
        data.append(dict(phase=phase, batch=b, tokens=t, ms={n: s * 1e3 for n, s in zip(names, times)}))
    sec.table(f"Llama-3-8B-shaped decoder, {tier.llama.layers} layers: ms per call", ["phase", "B", "T", *names], rows)
    for flash, peers in (
        ("flashtune", ("inductor", "inductor max-autotune-no-cudagraphs")),
        ("flashtune + CUDA graphs", ("inductor reduce-overhead",)),
    ):
        have = [p for p in peers if p in names]
        if flash in names and have:
            ratios = [min(r["ms"][p] for p in have) / r["ms"][flash] for r in data]
            if ratios:
                sec.note(f"{flash} vs best of {have}: worst {min(ratios):.3f}x, geomean {_geomean(ratios):.3f}x")
    sec.record["data"].update(setup=setup_rows, timings=data)
    # A few seconds, so run past the budget too: it is what the decode rows above cannot say.
    host_breakdown(sec, tier, {n: ready[n] for n in ("inductor", "flashtune") if n in ready}, tokens[(1, 1)])


def section_training(sec: Section, tier: Tier) -> None:
    """Training steps (forward, backward, AdamW), ``bench_training.py``'s models at this tier's
    sizes, fp32 and bf16 autocast: ms per step for eager, Inductor (default and, on a GPU,
    max-autotune-no-cudagraphs) and flashtune, each its own copy, and the loss after a few steps
    relative to eager's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_training import BlockLoss, Gpt2

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    names = ["eager", "inductor", "flashtune"]
    if tier.device == "cuda":
        names.insert(2, "inductor max-autotune-no-cudagraphs")
    c, g = tier.training, torch.Generator(device="cpu").manual_seed(1)
    vocab, width, layers, heads = c.gpt2
    hidden, inter, block_heads, block_layers = c.block
    models = {
        "gpt2": (
            lambda: Gpt2(vocab, width, layers, heads, ctx=c.batch[1]),
            [tuple(torch.randint(0, vocab, c.batch, generator=g).to(tier.device) for _ in "xy") for _ in range(4)],
        ),
        "llama block": (
            lambda: BlockLoss(hidden, inter, block_heads, block_layers),
            [tuple(torch.randn(c.block_tokens, hidden, generator=g).to(tier.device) for _ in "xy") for _ in range(4)],
        ),
    }
    rows, data = [], []
    for model_name, (make, batches) in models.items():
        if model_name not in c.models:
            continue
        for precision in ("fp32", "bf16"):
            if sec.over_budget(f"training from {model_name} {precision}"):
                break
            torch.manual_seed(0)
            base = make().to(tier.device)
            steps, losses = {}, {}
            for name in names:
                model = copy.deepcopy(base)
                mode = "max-autotune-no-cudagraphs" if "max-autotune" in name else None
                backend = "flashtune" if name == "flashtune" else "inductor"
                fn = model if name == "eager" else torch.compile(model, backend=backend, mode=mode, dynamic=False)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

                def step(batch, fn=fn, opt=opt, bf16=precision == "bf16"):
                    with torch.autocast(tier.device, dtype=torch.bfloat16, enabled=bf16):
                        loss = fn(*batch)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss.detach()

                losses[name] = float([step(b) for b in batches][-1])
                steps[name] = partial(step, batches[0])
            times = medians(tier, [steps[n] for n in names])
            rel = {n: abs(losses[n] - losses["eager"]) / abs(losses["eager"]) for n in names}
            rows.append([model_name, precision, *(t * 1e3 for t in times), f"{rel['flashtune']:.1e}"])
            data.append(
                dict(model=model_name, precision=precision, ms={n: t * 1e3 for n, t in zip(names, times)}, loss_rel=rel)
            )
    sec.table("training steps: ms per step", ["model", "precision", *names, "flashtune loss rel. eager"], rows)
    for r in data:
        ratio = r["ms"]["inductor"] / r["ms"]["flashtune"]
        sec.note(f"{r['model']} {r['precision']}: flashtune vs inductor {ratio:.3f}x")
    sec.record["data"]["training"] = data


def host_breakdown(sec: Section, tier: Tier, fns: dict[str, Callable], x: torch.Tensor, calls: int = 20) -> None:
    """Where a decode call's host time goes, per contender: microseconds per call of enqueueing
    (the calls timed with no sync between them), the torch.profiler ops with the most self CPU
    time, and for flashtune the Python functions with the most own time (cProfile). Without CUDA
    graphs, small decode steps wait on the host; this says on what."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    rows, python_rows = [], []
    with torch.no_grad():
        for name, fn in fns.items():
            fn(x)
            sync(tier)
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            host_us = (time.perf_counter() - start) / calls * 1e6
            sync(tier)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    fn(x)
                sync(tier)
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            rows.append([name, "(all: enqueue, no sync)", round(host_us, 1), calls])
            rows += [[name, e.key[:70], round(e.self_cpu_time_total / calls, 1), e.count] for e in events[:8]]
            if name == "flashtune":
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(calls):
                    fn(x)
                profiler.disable()
                sync(tier)
                stats = pstats.Stats(profiler).sort_stats("tottime")
                for (file, line, func), (_, ncalls, tottime, _, _) in list(stats.stats.items()):
                    python_rows.append([f"{Path(file).name}:{line} {func}", ncalls, round(tottime / calls * 1e6, 1)])
    sec.table(f"decode B=1: host time per call ({calls} calls)", ["contender", "op", "self us / call", "count"], rows)
    python_rows.sort(key=lambda r: r[2], reverse=True)
    header = ["function", "calls", "us / call"]
    sec.table("flashtune decode B=1: Python functions by own time", header, python_rows[:15])


def section_host(sec: Section, tier: Tier) -> None:
    """Host microseconds per op: one linear at M = 1 compiled each way, called ``calls`` times
    with no sync between (a call's enqueue time; the GPU time at this size is far below it); and
    the Triton GEMM's launch alone, through its bound launcher and through Triton's own."""
    from flashtune_compile.kernels import triton_launch
    from flashtune_compile.kernels.triton_runner import TritonGemmRunner

    n, k = tier.host_nk
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False).to(device=tier.device, dtype=tier.dtype).eval()
    x = randn(1, k, tier=tier)
    calls = 200 if tier.device == "cuda" else 20

    def per_call_us(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        sync(tier)
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - start) / calls)
            sync(tier)
        return sorted(samples)[2] * 1e6

    rows, data = [], {}
    kinds = {"eager F.linear": None, "inductor": dict(backend="inductor"), "flashtune": dict(backend="flashtune")}
    with torch.no_grad(), ft.autotune():
        for name, kwargs in kinds.items():
            fn = copy.deepcopy(base) if kwargs is None else torch.compile(copy.deepcopy(base), **kwargs)
            data[name] = per_call_us(lambda fn=fn: fn(x))
            chosen = entry_for("linear", 1) if name == "flashtune" else None
            rows.append([name, round(data[name], 2), f"{chosen['kernel']}[{chosen['tactic']}]" if chosen else ""])
        runner, w = TritonGemmRunner.for_op(LINEAR), base.weight
        tactic = runner.get_valid_tactics((x, w, None), BucketProfile((1,), (x.shape, w.shape, None)))[0]
        saved = triton_launch._BIND
        for name, bind in (("Triton GEMM, bound launcher", True), ("Triton GEMM, Triton's launcher", False)):
            triton_launch._BIND = bind
            try:
                data[name] = per_call_us(lambda: runner.forward((x, w, None), tactic))
            finally:
                triton_launch._BIND = saved
            rows.append([name, round(data[name], 2), f"triton_gemm[{tactic}] (runner.forward)"])
    rows.append(["flashtune minus inductor", round(data["flashtune"] - data["inductor"], 2), ""])
    title = f"host us per call: one linear, M=1, N={n}, K={k} ({calls} calls, no sync)"
    sec.table(title, ["contender", "us", "kernel"], rows)
    bound = [type(v).__name__ for v in triton_launch.bound_launchers().values()]
    sec.note(f"Triton launchers bound: {len(bound)} ({', '.join(sorted(set(bound))) or 'none'})")
    sec.record["data"].update(host_us=data, bound=bound)


def section_offline(sec: Section, tier: Tier, dry: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "model.ftart"
        rows, results = [], {}
        for phase in ("cold", "warm"):
            env = dict(os.environ)
            env["FLASHTUNE_CACHE_DIR"] = str(Path(tmp) / f"{phase}-cache")  # nothing cached but the artifact
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / f"{phase}-inductor")
            cmd = [sys.executable, __file__, "--offline-worker", phase, "--artifact", str(artifact)]
            cmd += ["--dry-run"] if dry else ["--tier", tier.name]
            start = time.perf_counter()
            budget = max(30.0, sec.deadline - time.perf_counter())
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=budget)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise RuntimeError(f"{phase} process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results[phase] = {**result, "process_s": wall}
            row = [phase, round(wall, 2), result["first_output_s"], result["ready_s"], result["tuning_s"]]
            rows.append([*row, result["timings"], result["tuned"]])
    header = ["process", "wall s", "to first output s", "to ready s", "tuning s", "timings run", "buckets tuned"]
    sec.table(
        f"offline: cold process vs a fresh one loading the artifact (token counts {list(tier.offline_tokens)})",
        header,
        rows,
    )
    sec.record["data"] = results
    if results["warm"]["timings"] != 0:
        raise AssertionError(f"the warm process ran {results['warm']['timings']} timings (must be 0)")


def offline_worker(phase: str, artifact: Path, tier: Tier) -> None:
    """One process of the offline section: prints one JSON line."""
    start = time.perf_counter()
    loaded = ft.load_artifacts(artifact) if phase == "warm" else None
    model = decoder(tier, layers=1)
    compiled = torch.compile(model, backend="flashtune", dynamic=True)
    x = torch.randint(0, tier.llama.vocab, (1, tier.offline_tokens[0]), device=tier.device)
    with torch.no_grad(), ft.autotune():
        compiled(x)
    sync(tier)
    first = time.perf_counter() - start
    report = ft.warmup(
        compiled,
        lambda n: (torch.randint(0, tier.llama.vocab, (1, n), device=tier.device),),
        num_tokens=list(tier.offline_tokens),
        progress=False,
    )
    sync(tier)
    saved = ft.save_artifacts(artifact) if phase == "cold" else None
    ready = time.perf_counter() - start
    stats = ft.stats()
    out = dict(first_output_s=round(first, 2), ready_s=round(ready, 2), timings=stats["profiles"], tuned=report.tuned)
    out["tuning_s"] = round(stats["tuning_seconds"], 2)
    print(json.dumps({**out, "loaded": loaded, "saved": saved}))


SECTIONS = ("env", "bandwidth", "tests", "linear", "quantized", "moe", "e2e", "training", "host", "offline")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="directory for report.md and results.json")
    p.add_argument("--tier", choices=("quick", "full"), default="quick")
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny shapes, Triton interpreted")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="SECTION=SECONDS",
        help="override one section's time budget (repeatable), e.g. --budget e2e=200",
    )
    p.add_argument("--offline-worker", choices=("cold", "warm"), help=argparse.SUPPRESS)
    p.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tier = TIERS["dry" if args.dry_run else args.tier]
    if args.offline_worker:
        offline_worker(args.offline_worker, args.artifact, tier)
        return 0
    if args.out is None:
        p.error("--out DIR is required")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad}; valid: {list(SECTIONS)}")
    budgets = dict(tier.budgets)
    for item in args.budget:
        name, _, secs = item.partition("=")
        if name not in SECTIONS or not re.fullmatch(r"\d+(\.\d+)?", secs):
            p.error(f"--budget {item!r}: expected SECTION=SECONDS with SECTION one of {list(SECTIONS)}")
        budgets[name] = float(secs)
    tier = dataclasses.replace(tier, budgets=budgets)
    if tier.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: run on an NVIDIA GPU, or pass --dry-run for the CPU rehearsal")
    # Every bucket is tuned here, in a cache of this run's own: figures never come from an old cache.
    cache = Path(tempfile.mkdtemp(prefix="flashtune-suite-"))
    ft.AutoTuner.reset(ft.AutoTuner(cache_dir=cache, settings=tier.settings if args.dry_run else None))
    report = Report(args.out, tier)
    say(f"flashtune GPU suite, {tier.name} tier -> {args.out} ({report.meta['gpu'] or 'CPU'})")
    read_bw: list[float] = []  # the bandwidth section's figure, for the linear section's shares
    runs = {
        "env": lambda s: section_env(s, tier),
        "bandwidth": lambda s: read_bw.append(section_bandwidth(s, tier)),
        "tests": lambda s: section_tests(s, tier, args.dry_run),
        "linear": lambda s: section_linear(s, tier, read_bw[0] if read_bw else None),
        "quantized": lambda s: section_quantized(s, tier, read_bw[0] if read_bw else None),
        "moe": lambda s: section_moe(s, tier, read_bw[0] if read_bw else None),
        "e2e": lambda s: section_e2e(s, tier),
        "training": lambda s: section_training(s, tier),
        "host": lambda s: section_host(s, tier),
        "offline": lambda s: section_offline(s, tier, args.dry_run),
    }
    start = time.perf_counter()
    for name in SECTIONS:
        if name in only:
            report.run(name, runs[name])
    report.meta["suite_seconds"] = round(time.perf_counter() - start, 1)
    report.write()
    failed = [n for n, s in report.sections.items() if s["status"] != "ok"]
    say(f"done in {report.meta['suite_seconds']}s; failed sections: {failed or 'none'}; see {args.out / 'report.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
