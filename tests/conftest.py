import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter (tests only)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging

import pytest

import flashtune_compile as ft
from flashtune_compile.tuner.profiler import ProfilerSettings

# Short timing blocks: tests check what is chosen and counted, not how fast it is.
FAST = ProfilerSettings(block_seconds=2e-4, rounds=3, prune_after=2)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FLASHTUNE_CACHE_DIR", str(d))
    monkeypatch.delenv("FLASHTUNE_TUNE", raising=False)
    return d


@pytest.fixture
def tuner(cache_dir):
    """A fresh process-wide tuner writing to a temporary cache dir."""
    t = ft.AutoTuner(settings=FAST)
    old = ft.AutoTuner.reset(t)
    logging.getLogger("flashtune").setLevel(logging.INFO)
    yield t
    ft.AutoTuner.reset(old)
