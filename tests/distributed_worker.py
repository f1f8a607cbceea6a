"""One rank of a gloo job for tests/test_distributed.py; writes what it saw as JSON to OUT/rank<r>.json.

Usage: python distributed_worker.py SCENARIO RANK WORLD PORT OUT
  SCENARIO "agree":  (1) a compiled tensor-parallel MLP (all-reduce in its forward) whose cache is
                     warm on rank 0 only; (2) an op whose fastest tactic differs per rank, tuned
                     alone first, then together; (3) a data-parallel ``ft.warmup(distributed=True)``.
  SCENARIO "raise":  rank 1's default raises while the ranks tune together.
  SCENARIO "die":    rank 1's process exits while the ranks tune together.
  SCENARIO "version": rank 1 runs another flashtune version.
Each rank's tactic cache lives in OUT/cache<r> (separate machines, as far as caches go).
"""

import json
import os
import sys
import time

RANK, WORLD, PORT, OUT = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
os.environ["FLASHTUNE_CACHE_DIR"] = os.path.join(OUT, f"cache{RANK}")
os.environ["FLASHTUNE_DISTRIBUTED_TIMEOUT"] = "40"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

import flashtune_compile as ft  # noqa: E402
from flashtune_compile.tuner.profiler import ProfilerSettings  # noqa: E402

# back-to-back timing: the tactics below differ by sleeps, not by what they find in the caches, and
# four ranks on two cores each evicting 48 MB between calls would only add noise (sleep(0) yields)
FAST = ProfilerSettings(block_seconds=2e-4, rounds=3, prune_after=2, settle_seconds=0.0, cold_l2=False)
OPTIONS = {"inner": "eager", "kernels": {"aten", "cpu"}, "buckets": "pow2", "max_tokens": 64}
TACTICS = ("a", "b", "c", "d")


def fresh_tuner():
    """A new process tuner on the same cache directory (what a restarted job would see)."""
    ft.AutoTuner.reset(ft.AutoTuner(settings=FAST))


def winners(op):
    """This rank's cached winners of ``op`` as JSON lists."""
    where = os.path.realpath(os.environ["FLASHTUNE_CACHE_DIR"])
    return sorted(
        [r["op"], str(r["shape_key"]), r["bucket"], r["kernel"], r["tactic"]]
        for r in ft.tactics()
        if r["cache_dir"] and os.path.realpath(r["cache_dir"]) == where and r["op"] == op
    )


class ShardMLP(nn.Module):
    """One rank's shard of a tensor-parallel MLP: column-parallel up, row-parallel down."""

    def __init__(self, hidden, inner):
        super().__init__()
        g = torch.Generator().manual_seed(RANK)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class TensorParallelMLP(nn.Module):
    def __init__(self, shard):
        super().__init__()
        self.shard = shard

    def forward(self, x):
        y = self.shard(x)
        dist.all_reduce(y)
        return y


class Default(ft.TunableRunner):
    name = "mm_default"

    def forward(self, inputs, tactic=-1):
        if RANK == 1 and SCENARIO == "raise":
            raise RuntimeError("rank 1's kernel broke")
        time.sleep(0.004)
        return inputs[0] @ inputs[1]


class RankSkewed(ft.TunableRunner):
    """x @ w; tactic TACTICS[r] is the fastest on rank r (the others sleep), so ranks tuning alone
    pick different winners."""

    name = "mm_rank_skewed"

    def get_valid_tactics(self, inputs, profile):
        return list(TACTICS)

    def forward(self, inputs, tactic=-1):
        if SCENARIO == "die" and RANK == 1:
            os._exit(3)
        time.sleep(0.0 if TACTICS.index(tactic) == RANK % len(TACTICS) else 0.002)
        return inputs[0] @ inputs[1]


RUNNERS = (Default(), RankSkewed())
CONFIG = ft.TuningConfig(dynamic=(ft.DynamicDim(0, 0, buckets="pow2", max_size=64),))


def skewed_op(x, w):
    runner, tactic = ft.AutoTuner.get().choose_one("rank_skewed_mm", RUNNERS, CONFIG, (x, w))
    y = runner.forward((x, w), tactic)
    dist.all_reduce(y)  # the op sits in a model whose forward all-reduces
    return y, [runner.name, tactic]


def agree():
    out = {}
    fresh_tuner()  # every tuner of this job times alike, so they share one cache environment
    # (1) compiled tensor-parallel MLP, rank 0 warm, the others cold
    torch.manual_seed(0)
    shard = ShardMLP(16, 32)
    if RANK == 0:
        alone = torch.compile(ShardMLP(16, 32), backend="flashtune", dynamic=True, options=OPTIONS)
        ft.warmup(alone, lambda n: (torch.randn(n, 16),), [2, 8], progress=False, distributed=False)
    out["warm_before"] = winners("linear")
    fresh_tuner()
    model = TensorParallelMLP(shard)
    compiled = torch.compile(model, backend="flashtune", dynamic=True, options=OPTIONS)
    with ft.autotune(), torch.no_grad():
        for n in (2, 8):
            x = torch.randn(n, 16, generator=torch.Generator().manual_seed(n))
            torch.testing.assert_close(compiled(x), model(x))
    out["tp_profiles"] = ft.stats()["profiles"]
    out["tp_winners"] = winners("linear")

    # (2) different winners alone, one winner together; candidates split across the ranks
    fresh_tuner()
    g = torch.Generator().manual_seed(5)  # the same inputs on every rank
    x, w = torch.randn(5, 8, generator=g), torch.randn(8, 8, generator=g)
    with ft.autotune():
        ft.AutoTuner.get().choose_one("rank_skewed_mm", RUNNERS, CONFIG, (x, w), distributed="off")
    out["alone"] = winners("rank_skewed_mm")
    fresh_tuner()
    with ft.autotune():
        y, choice = skewed_op(x, w)
    torch.testing.assert_close(y, WORLD * (x @ w))
    out["together"] = winners("rank_skewed_mm")
    out["together_choice"] = choice
    out["together_profiles"] = ft.stats()["profiles"]

    # (3) data-parallel replicas: each rank warms its share of the token counts, all end with all winners
    fresh_tuner()
    replica = torch.compile(ShardMLP(24, 40), backend="flashtune", dynamic=True, options=OPTIONS)
    report = ft.warmup(replica, lambda n: (torch.randn(n, 24),), [1, 2, 4, 8, 16, 32], progress=False, distributed=True)
    out["dp_counts"] = [s.num_tokens for s in report.steps]
    out["dp_tuned"] = report.tuned
    out["dp_merged"] = report.merged
    out["dp_winners"] = [
        w for w in winners("linear") if "(40, 24)" in w[1] or "(24, 40)" in w[1]
    ]  # the replica's two linears
    return out


def fault():
    fresh_tuner()
    x, w = torch.randn(7, 8), torch.randn(8, 8)
    start = time.perf_counter()
    try:
        with ft.autotune():
            skewed_op(x, w)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
    return {"error": None, "seconds": time.perf_counter() - start}


def version():
    if RANK == 1:
        ft.__version__ = "9.9.9"
    return fault()


SCENARIO = sys.argv[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{PORT}", rank=RANK, world_size=WORLD)
torch._dynamo.config.cache_size_limit = 64
result = {"agree": agree, "raise": fault, "die": fault, "version": version}[SCENARIO]()
with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
    json.dump(result, f)
if SCENARIO == "agree":
    dist.barrier()
    dist.destroy_process_group()
else:  # after a fault the group's state is undefined: leave without tearing it down (gloo may abort)
    os._exit(0)
