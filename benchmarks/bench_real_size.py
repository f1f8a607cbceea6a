"""Real-size decoders on this CPU: eager, Inductor and flashtune, one after another on one model object.

    python benchmarks/bench_real_size.py --model llama3b        # Llama-3.2-3B-shaped, bf16, 6.4 GB
    python benchmarks/bench_real_size.py --model llama8b        # Llama-3-8B-shaped, bf16, 16 GB
    python benchmarks/bench_real_size.py --model mixtral        # Mixtral-8x7B's layers (2 of 32), bf16
    python benchmarks/bench_real_size.py --model llama3b --budget-mb 64,0   # small budget vs copies off

A KV-cache greedy decode loop as gpt-fast writes it (``real_models.py``): the prompt's prefill
compiled with dynamic shapes, the one-token step with ``fullgraph=True``; random weights built on
the meta device and materialized once. Contenders, each with its own KV cache and its own compiled
functions (one model object, so they share its code object: a raised cache size limit keeps every
contender's graphs, told apart by Dynamo's backend guard):

- ``eager``; ``inductor`` (default); ``max-autotune`` (Inductor's max-autotune mode);
  ``max-autotune-freezing`` (the same with freezing set in ``torch._inductor.config``, run only where
  its frozen constants fit: each compiled graph, prefill and decode, holds its own copy of the
  weights, so it needs about three times their memory);
- ``flashtune``: ``backend="flashtune"`` with default options, its tactic cache in a fresh
  directory (so time to ready includes tuning) unless ``--cache-dir``;
- ``flashtune-frozen``: the same after ``ft.freeze(model)``. Freezing changes the model every
  contender shares, so it runs last, in its own phase after the others' rounds, timed against an
  eager anchor taken just before (eager's own rounds, not interleaved with it).

Each contender's phase (compile, prefill, two tokens) is timed as *ready*; then it decodes
``--warmup`` tokens untimed (steady state: flashtune makes a site's weight copies on their 8th call),
and its peak RSS is the process's high-water mark over the whole phase (reset first:
``/proc/self/clear_refs``), which includes the model every contender shares. Then every contender
decodes ``--rounds`` rounds of ``--tokens`` tokens, interleaved in a shuffled order per round, and ms
per token is the median over rounds.
Greedy tokens are compared with eager's: a first difference where eager's two best logits are
within ``--tie`` of each other is a bf16 tie, not an error.

``--budget-mb A,B``: flashtune only, once per weight-copy budget (``FLASHTUNE_WEIGHT_CACHE_MB``; 0
turns copy tactics off), each with its own tuner and tactic cache: the model several times larger
than the budget must run no slower than with copies off.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import SHAPES, Decoder, build, parameters_bytes  # noqa: E402
from timing import read_gbs  # noqa: E402

import flashtune_compile as ft  # noqa: E402


def rss_gb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in GB."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) * 1024 / 1e9
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> None:
    """Start a new high-water mark of RSS (Linux 4.0+), after giving freed memory back to the OS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


@dataclass
class Contender:
    """One way to run the model: its prefill and decode callables and its own generation state."""

    name: str
    prefill: object
    decode: object
    caches: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    logits: list = field(default_factory=list)
    pos: int = 0
    ready_s: float = 0.0
    peak_gb: float = 0.0
    before_gb: float = 0.0
    step_ms: list = field(default_factory=list)
    tuner: object = None  # flashtune's: made current before each of its rounds

    def start(self, model: Decoder, prompt: torch.Tensor) -> None:
        self.caches = model.new_caches()
        n = prompt.shape[1]
        logits = self.prefill(prompt, torch.arange(n), self.caches)
        self.pos = n
        self._take(logits)

    def step(self) -> None:
        logits = self.decode(self.tokens[-1].view(1, 1), torch.tensor([self.pos]), self.caches)
        self.pos += 1
        self._take(logits)

    def _take(self, logits: torch.Tensor) -> None:
        self.logits.append(logits[0, -1].float())
        self.tokens.append(logits[0, -1].argmax())


def make(name: str, model: Decoder, options: dict | None = None) -> Contender:
    fwd = model.forward
    if name == "eager":
        return Contender(name, fwd, fwd)
    if name == "inductor":
        return Contender(
            name, torch.compile(fwd, dynamic=True, fullgraph=True), torch.compile(fwd, fullgraph=True, dynamic=False)
        )
    if name == "max-autotune":
        return Contender(
            name,
            torch.compile(fwd, mode="max-autotune", dynamic=True, fullgraph=True),
            torch.compile(fwd, mode="max-autotune", fullgraph=True, dynamic=False),
        )
    if name == "max-autotune-freezing":

        def compiled(dynamic: bool):
            inner = torch.compile(fwd, mode="max-autotune", fullgraph=True, dynamic=dynamic)

            def call(*args):
                with torch._inductor.config.patch(freezing=True):
                    return inner(*args)

            return call

        return Contender(name, compiled(True), compiled(False))
    if name.startswith("flashtune"):
        opts = options or {}
        kw = {"options": opts} if opts else {}
        return Contender(
            name,
            torch.compile(fwd, backend="flashtune", dynamic=True, fullgraph=True, **kw),
            torch.compile(fwd, backend="flashtune", fullgraph=True, dynamic=False, **kw),
        )
    raise SystemExit(f"unknown contender {name!r}")


def fits_frozen(model: Decoder) -> bool:
    """Whether Inductor's frozen constants fit in available memory: a copy of the weights per
    compiled graph (prefill and decode) and as much again while it folds and autotunes them (the
    3B model at 6.4 GB was killed for memory at 24 GB on this 24 GB machine, 2026-12-06)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return parameters_bytes(model) * 3 + 2e9 < avail


def run_frozen(args: argparse.Namespace, model: Decoder, prompt: torch.Tensor, others: list[Contender]) -> Contender:
    """The flashtune-frozen phase: an eager anchor's rounds, ``ft.freeze``, compile, its rounds.
    Its rounds are scaled to the interleaved ones by eager's: its ms per token times (eager's
    interleaved median / the anchor's median), so a drift of the memory's speed between the two
    phases does not count for or against it."""
    eager = next((c for c in others if c.name == "eager"), None)
    anchor: list[float] = []
    with torch.no_grad():
        if eager is not None:
            for _ in range(args.rounds):
                start = time.perf_counter()
                for _ in range(args.tokens):
                    eager.step()
                anchor.append((time.perf_counter() - start) / args.tokens * 1e3)
        for c in others:  # their rounds are done: free their KV caches and weight copies
            c.caches = []
            if c.tuner is not None:
                c.tuner.weights.clear()
        reset_peak()
        before, _ = rss_gb()
        os.environ["FLASHTUNE_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="flashtune-bench-")
        ft.AutoTuner.reset(ft.AutoTuner())
        start = time.perf_counter()
        report = ft.freeze(model)
        print(f"  flashtune-frozen: {report}", flush=True)
        c = make("flashtune", model, json.loads(args.flashtune_options))
        c.name = "flashtune-frozen"
        c.start(model, prompt)
        for _ in range(2):
            c.step()
        c.ready_s = time.perf_counter() - start
        for _ in range(args.warmup):
            c.step()
        c.before_gb, (_, c.peak_gb) = before, rss_gb()
        print(f"  {c.name:>16}: ready in {c.ready_s:6.1f}s, peak RSS {c.peak_gb:.2f} GB (RSS before {before:.2f} GB)")
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.tokens):
                c.step()
            c.step_ms.append((time.perf_counter() - start) / args.tokens * 1e3)
    if anchor:
        scale = statistics.median(eager.step_ms) / statistics.median(anchor)
        print(f"  eager anchor {statistics.median(anchor):.1f} ms/token (interleaved: x{scale:.3f})", flush=True)
        c.step_ms = [ms * scale for ms in c.step_ms]
    return c


def agreement(c: Contender, ref: Contender, tie: float) -> str:
    """How c's greedy tokens compare with eager's: all equal, or the first difference and whether
    eager's two best logits there were within ``tie`` (a bf16 tie)."""
    for i, (a, b) in enumerate(zip(c.tokens, ref.tokens)):
        if int(a) != int(b):
            gap = float(ref.logits[i][int(b)] - ref.logits[i][int(a)])
            kind = "tie" if gap <= tie else "DIFFERENT"
            return f"equal to token {i} of {len(ref.tokens)}, then a {kind} (eager's logit gap {gap:.3f})"
    return f"all {min(len(c.tokens), len(ref.tokens))} equal"


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    t0 = time.perf_counter()
    model = build(args.model, layers=args.layers)
    shape = model.s
    gb = parameters_bytes(model) / 1e9
    rss, _ = rss_gb()
    print(
        f"{args.model}: {shape.layers} layers, dim {shape.dim}, ffn {shape.ffn}"
        f"{f', {shape.experts} experts top {shape.top_k}' if shape.experts else ''}, vocab {shape.vocab}; "
        f"{gb:.2f} GB of bf16 weights, built in {time.perf_counter() - t0:.0f}s (RSS {rss:.2f} GB); "
        f"{torch.get_num_threads()} threads; read rate {read_gbs(256):.0f} GB/s",
        flush=True,
    )
    prompt = torch.randint(0, shape.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    names = args.contenders.split(",")
    budgets = [b for b in args.budget_mb.split(",") if b] if args.budget_mb else []
    if budgets:
        names = [f"flashtune@{b}MB" for b in budgets]
    contenders: list[Contender] = []
    for name in names:
        if name == "max-autotune-freezing" and not fits_frozen(model):
            print(f"skipping {name}: three copies of the {gb:.1f} GB of weights do not fit in memory", flush=True)
            continue
        if name == "flashtune-frozen":
            continue  # after the others' rounds: freezing changes the shared model
        reset_peak()
        before, _ = rss_gb()
        cache = args.cache_dir or tempfile.mkdtemp(prefix="flashtune-bench-")
        os.environ["FLASHTUNE_CACHE_DIR"] = cache
        if name.startswith("flashtune@"):
            os.environ["FLASHTUNE_WEIGHT_CACHE_MB"] = name.split("@")[1].removesuffix("MB")
        else:
            os.environ.pop("FLASHTUNE_WEIGHT_CACHE_MB", None)
        if name.startswith("flashtune") and budgets:
            ft.AutoTuner.reset(ft.AutoTuner())  # its own tuner: budget, copies, tactic cache
        start = time.perf_counter()
        c = make(name, model, json.loads(args.flashtune_options) if name.startswith("flashtune") else None)
        with torch.no_grad():
            c.start(model, prompt)
            for _ in range(2):
                c.step()
            c.ready_s = time.perf_counter() - start
            for _ in range(args.warmup):
                c.step()
        c.before_gb, (_, c.peak_gb) = before, rss_gb()
        c.tuner = ft.AutoTuner.get() if name.startswith("flashtune") else None
        extra = ""
        if name.startswith("flashtune"):
            s = ft.stats()
            extra = (
                f"; weight copies {s['weight_cache_bytes'] / 1e9:.2f} GB held (budget "
                f"{s['weight_cache_budget'] / 1e9:.2f} GB), {s['weight_copies_made']} made, "
                f"{s['weight_copies_denied']} left out; {s['routed_ops']} ops routed"
            )
        memory = f"peak RSS {c.peak_gb:.2f} GB (RSS before {before:.2f} GB)"
        print(f"  {name:>16}: ready in {c.ready_s:6.1f}s, {memory}{extra}", flush=True)
        contenders.append(c)
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(args.rounds):
            order = list(contenders)
            rng.shuffle(order)
            for c in order:
                if c.tuner is not None:
                    ft.AutoTuner.reset(c.tuner)
                start = time.perf_counter()
                for _ in range(args.tokens):
                    c.step()
                c.step_ms.append((time.perf_counter() - start) / args.tokens * 1e3)
    if "flashtune-frozen" in names:
        contenders.append(run_frozen(args, model, prompt, contenders))
    ref = contenders[0]
    peers = [statistics.median(c.step_ms) for c in contenders if not c.name.startswith("flashtune")]
    base = min(peers) if peers else statistics.median(ref.step_ms)
    print(
        f"\n{'contender':>16} {'ms/token':>9} {'vs best peer':>12} {'peak RSS':>9} {'ready':>7}  tokens vs {ref.name}"
    )
    rows = []
    for c in contenders:
        ms = statistics.median(c.step_ms)
        row = {
            "name": c.name,
            "ms_per_token": ms,
            "speedup_vs_best_peer": base / ms,
            "peak_rss_gb": c.peak_gb,
            "rss_before_gb": c.before_gb,
            "ready_s": c.ready_s,
            "tokens": agreement(c, ref, args.tie) if c is not ref else f"{len(ref.tokens)} tokens (reference)",
            "rounds_ms": c.step_ms,
        }
        rows.append(row)
        print(f"{c.name:>16} {ms:>9.1f} {base / ms:>11.2f}x {c.peak_gb:>7.2f}GB {c.ready_s:>6.0f}s  {row['tokens']}")
    return {
        "model": args.model,
        "layers": shape.layers,
        "weights_gb": gb,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "contenders": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the model's depth")
    ap.add_argument(
        "--contenders", default="eager,inductor,max-autotune,max-autotune-freezing,flashtune,flashtune-frozen"
    )
    ap.add_argument("--flashtune-options", default="{}", help="JSON options for backend='flashtune' (default: none)")
    ap.add_argument("--budget-mb", default="", help="flashtune only, once per weight-copy budget in MiB (e.g. 64,0)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8, help="tokens per contender per round")
    ap.add_argument("--warmup", type=int, default=10, help="untimed tokens per contender after it is ready")
    ap.add_argument("--tie", type=float, default=0.0625, help="eager logit gap below which a differing token is a tie")
    ap.add_argument("--cache-dir", default=None, help="flashtune's tactic cache (default: a fresh one)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    shape = SHAPES[args.model]
    if args.prompt + 2 + args.warmup + 2 * args.rounds * args.tokens > shape.max_seq:  # eager: twice if frozen
        raise SystemExit(f"prompt + tokens exceed the model's max_seq {shape.max_seq}")
    out = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
