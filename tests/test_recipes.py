"""Every recipe in examples/ runs as the README tells a user to run it (its ``main()``), and what it
computes with flashtune equals what eager computes, with flashtune's ops actually in the graph."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashtune_compile as ft

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _recipe(name: str):
    """examples/<name>.py imported as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_hugging_face_generate_with_a_static_cache(tuner, capsys):
    pytest.importorskip("transformers")
    eager, tuned = _recipe("hf_generate").main(new_tokens=6)
    assert torch.equal(tuned, eager)
    assert ft.stats()["routed_ops"] >= 2 * 7 + 1  # every linear of the 2 layers, and the LM head
    assert "equal" in capsys.readouterr().out


def test_kv_cache_decode_loop_with_fullgraph(tuner):
    eager, tuned = _recipe("kv_decode").main(new_tokens=6)
    assert tuned == eager
    assert ft.stats()["routed_ops"] >= 2 * (2 * 4 + 1)  # prefill's and decode's graphs


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_training_loop(tuner, autocast):
    eager, tuned = _recipe("train").main(steps=3, autocast=autocast)
    tol = 1e-5 if not autocast else 2e-2  # bf16: the products' own rounding
    assert all(abs(a - b) <= tol * abs(a) for a, b in zip(eager, tuned)), (eager, tuned)
    stats = ft.stats()
    assert stats["routed_ops"] + stats["handed_back"] == 2 * 4 + 1  # every matmul tuned: kept routed or handed back


def test_moe_model(tuner):
    eager, tuned = _recipe("moe").main()
    for a, b in zip(eager, tuned):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert any(w["op"] == "moe" for w in ft.tactics())


def test_tuning_across_two_ranks_under_torchrun(tmp_path):
    env = {**os.environ, "FLASHTUNE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(EXAMPLES / "distributed.py"), "--max-tokens", "8", "--cache-dir", str(tmp_path / "ranks")]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "identical on every rank" in out.stdout and "output matches the unsharded model" in out.stdout
