"""Training steps on CPU: forward, backward and an AdamW step, eager vs Inductor (default and
max-autotune-no-cudagraphs) vs flashtune, per model and precision, in one process.

Models (``--models``):
  gpt2    GPT-2-shaped: token and position embeddings, 4 pre-norm layers of width 256 (4 heads,
          causal SDPA, GELU MLP of 1024), the output projection tied to the token embedding,
          cross-entropy over a 4096-token vocabulary; batch 8 x 128 tokens
  llama   a Llama-shaped block (bench_cpu_block.py's layers: RMSNorm, fused qkv, causal SDPA, SwiGLU),
          2 layers of hidden 512 and intermediate 1408, mean-squared error against a fixed target;
          256 tokens
Precisions (``--precisions``): fp32, and bf16 under ``torch.autocast("cpu", torch.bfloat16)``.

Every contender trains its own copy of one initial model with its own AdamW (lr 1e-3) on the same
batches; only the model is compiled (``dynamic=False``), the optimizer step runs eagerly for all.
First, ``--steps`` steps from the same start: each contender's loss after them, relative to eager's
(the aim in fp32: within 1e-5). Then timing: all contenders interleaved in a shuffled order over
``--rounds`` rounds, median ms per step after warm steps. Prints ms per step and flashtune's ratio
over Inductor default (> 1: flashtune faster), and a second Inductor copy's ("inductor-2", compiled
and timed like the first) over the first: the ratio two identical contenders show, so the noise
floor of flashtune's.

Run: python benchmarks/bench_training.py [--models gpt2,llama] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import platform
import random
import sys
import tempfile

import torch
import torch.nn.functional as F
from bench_cpu_block import Block
from timing import time_contenders
from torch import nn

import flashtune_compile as ft

CONTENDERS = ("eager", "inductor", "inductor-max", "flashtune", "inductor-2")


class Gpt2Layer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Gpt2(nn.Module):
    def __init__(self, vocab: int = 4096, width: int = 256, layers: int = 4, heads: int = 4, ctx: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(ctx, width)
        self.layers = nn.ModuleList(Gpt2Layer(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class BlockLoss(nn.Module):
    """bench_cpu_block.py's Llama-shaped block with a mean-squared error against a target."""

    def __init__(self, hidden: int = 512, inter: int = 1408, heads: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.block = Block(hidden, inter, heads, layers)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.block(x).float(), target)


def batches(model: str, n: int, gen: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if model == "gpt2":
        return [
            (torch.randint(0, 4096, (8, 128), generator=gen), torch.randint(0, 4096, (8, 128), generator=gen))
            for _ in range(n)
        ]
    return [(torch.randn(256, 512, generator=gen), torch.randn(256, 512, generator=gen)) for _ in range(n)]


def compiled(model: nn.Module, name: str) -> nn.Module:
    if name == "eager":
        return model
    if name in ("inductor", "inductor-2"):  # inductor-2: a second copy, the noise floor of the ratio
        return torch.compile(model, dynamic=False)
    if name == "inductor-max":
        return torch.compile(model, mode="max-autotune-no-cudagraphs", dynamic=False)
    return torch.compile(
        model, backend="flashtune", dynamic=False, options={"cache_dir": tempfile.mkdtemp(prefix="ft-train-")}
    )


def stepper(model: nn.Module, name: str, precision: str):
    """``step(batch) -> loss`` for one contender: its own compiled copy and AdamW."""
    fn = compiled(model, name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = fn(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    ap.add_argument("--steps", type=int, default=30, help="steps before the losses are compared")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ms", type=float, default=300.0, help="minimum milliseconds per sample")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 256  # copies of one module share a code object
    print(
        f"training steps on CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.machine()}, {datetime.datetime.now():%Y-%m-%d %H:%M}"
    )
    rows = []
    for model_name in args.models.split(","):
        for precision in args.precisions.split(","):
            torch.manual_seed(0)
            base = Gpt2() if model_name == "gpt2" else BlockLoss()
            data = batches(model_name, args.steps, torch.Generator().manual_seed(1))
            steps, losses = {}, {}
            for name in CONTENDERS:
                print(f"{model_name} {precision}: compiling {name} ...", file=sys.stderr, flush=True)
                before = ft.stats()
                steps[name] = stepper(copy.deepcopy(base), name, precision)
                losses[name] = float([steps[name](b) for b in data][-1])
                if name == "flashtune":
                    after = ft.stats()
                    routed, back = (after[k] - before[k] for k in ("routed_ops", "handed_back"))
                    print(f"{model_name} {precision}: flashtune routed {routed} call(s), handed {back} back to ATen")
            calls = {name: (lambda s=s, b=data[0]: s(b)) for name, s in steps.items()}
            ms = time_contenders(calls, args.rounds, args.ms, random.Random(0), warm=2)
            rel = {name: abs(losses[name] - losses["eager"]) / abs(losses["eager"]) for name in CONTENDERS}
            rows.append((model_name, precision, ms, rel))
            print(
                f"{model_name} {precision}: "
                + ", ".join(f"{n} {ms[n]:.1f} ms (loss rel {rel[n]:.1e})" for n in CONTENDERS)
                + f"; flashtune vs inductor {ms['inductor'] / ms['flashtune']:.3f}x"
                + f" (inductor-2 vs inductor {ms['inductor'] / ms['inductor-2']:.3f}x)",
                flush=True,
            )
    header = f"{'ft vs ind':>11}{'ind-2 vs ind':>14}{'loss rel':>10}"
    print(f"\n{'ms per step':>16}" + "".join(f"{n:>14}" for n in CONTENDERS) + header)
    for model_name, precision, ms, rel in rows:
        label = f"{model_name} {precision}"
        print(
            f"{label:>16}"
            + "".join(f"{ms[n]:>14.1f}" for n in CONTENDERS)
            + f"{ms['inductor'] / ms['flashtune']:>10.3f}x{ms['inductor'] / ms['inductor-2']:>13.3f}x"
            + f"{rel['flashtune']:>10.1e}"
        )


if __name__ == "__main__":
    main()
