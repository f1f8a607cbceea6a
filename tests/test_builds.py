"""One-time kernel builds never hang: a build killed halfway is redone by the next process, a
process waits for a live builder and uses its build, and a build lock held too long makes the
family unavailable to the waiting process while tuning goes on (kernels/extension.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest
import torch

import flashtune_compile as ft
from flashtune_compile.kernels import extension
from flashtune_compile.kernels.cpp import library_name

# Tunes a CPU linear bucket, then checks the library it loaded against F.linear directly.
TUNE = """
import logging, torch, torch.nn as nn, torch.nn.functional as F
import flashtune_compile as ft
from flashtune_compile.kernels.cpp import blocked_gemm_or_none
logging.basicConfig(level=logging.WARNING, format="LOG %(message)s")
torch.manual_seed(0)
model = nn.Linear(64, 48)
compiled = torch.compile(model, backend="flashtune", options={"inner": "eager", "kernels": {"aten", "cpu"}})
x = torch.randn(3, 64)
with torch.no_grad():
    torch.testing.assert_close(compiled(x), model(x))
lib = blocked_gemm_or_none()
if lib is not None:
    w, x = torch.randn(40, 64), torch.randn(5, 64)
    for mb, u in lib.rows_tiles:
        torch.testing.assert_close(lib.rows_linear(x, w, None, mb, u), F.linear(x, w))
print("LIBRARY", lib is not None, "KERNELS", sorted({r["kernel"] for r in ft.tactics()}))
"""
BUILD = "from flashtune_compile.kernels.cpp import load_blocked_gemm; load_blocked_gemm()"


def _start(script, env, log):
    """A Python process running ``script`` with stdout and stderr in ``log``, in its own process group."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for(log, text, proc, timeout=240):
    """Block until ``text`` appears in ``log``; fail (with the log) if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in Path(log).read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before logging {text!r}:\n{Path(log).read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} within {timeout} s:\n{Path(log).read_text()[-3000:]}")


def _finish(proc, log, timeout=400):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running after {timeout} s (hung?):\n{Path(log).read_text()[-3000:]}")
    text = Path(log).read_text()
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.fixture
def env(tmp_path):
    """A fresh extensions directory (so the library really builds) and cache directory."""
    return {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "FLASHTUNE_CACHE_DIR": str(tmp_path / "cache"),
        "FLASHTUNE_BUILD_WAIT_S": "300",
    }


def test_a_build_killed_halfway_is_redone_and_a_live_build_is_waited_for(env, tmp_path):
    """A starts the build and is SIGKILLed halfway, while B waits for it; B removes A's unfinished
    build and builds; C, started during B's build, waits and then loads B's. B and C tune a CPU
    bucket with the library and check it against F.linear."""
    logs = {name: tmp_path / f"{name}.log" for name in "abc"}
    a = _start(BUILD, env, logs["a"])
    _wait_for(logs["a"], "building the CPU kernel library", a)
    time.sleep(4)  # the compiler is running
    b = _start(TUNE, env, logs["b"])
    _wait_for(logs["b"], "waiting for another process's build of the CPU kernel library", b)
    os.killpg(a.pid, signal.SIGKILL)  # the process and its compilers, as a scheduler's timeout would
    a.wait()
    _wait_for(logs["b"], "building the CPU kernel library", b)
    c = _start(TUNE, env, logs["c"])
    out_b, out_c = _finish(b, logs["b"]), _finish(c, logs["c"])
    assert "removing an unfinished build left by a process that stopped" in out_b
    assert "built the CPU kernel library in" in out_b
    assert "waiting for another process's build" in out_c
    assert "using the CPU kernel library another process built" in out_c
    assert "building the CPU kernel library" not in out_c
    for out in (out_b, out_c):
        assert "LIBRARY True" in out, out[-3000:]
    root = Path(env["TORCH_EXTENSIONS_DIR"]) / "flashtune"
    assert not list(root.rglob("*.building-*")), "an unfinished build directory was left behind"


def test_a_build_lock_held_past_the_wait_leaves_the_family_out_and_tuning_goes_on(env, tmp_path):
    """The lock held by this (live) process for longer than FLASHTUNE_BUILD_WAIT_S: the tuning
    process waits that long, says so, tunes with the other candidates and equals eager."""
    root = Path(env["TORCH_EXTENSIONS_DIR"]) / "flashtune" / f"py{sys.version_info.major}{sys.version_info.minor}"
    root.mkdir(parents=True)
    lock = filelock.FileLock(str(root / f"{library_name()}.lock"))
    with lock:
        done = subprocess.run(
            [sys.executable, "-c", TUNE],
            env={**env, "FLASHTUNE_BUILD_WAIT_S": "2"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "waiting for another process's build of the CPU kernel library (at most 2 s" in out
    assert "CPU blocked GEMM kernels are not available on this machine" in out
    assert "FLASHTUNE_BUILD_WAIT_S" in out
    assert "LIBRARY False" in out, out[-3000:]
    winners = out.split("KERNELS", 1)[1]
    assert "cpu_rows" not in winners and "cpu_blocked" not in winners


def test_build_wait_comes_from_the_environment_and_bad_values_name_the_variable(monkeypatch):
    monkeypatch.setenv("FLASHTUNE_BUILD_WAIT_S", "12.5")
    assert extension.build_wait_s() == 12.5
    monkeypatch.delenv("FLASHTUNE_BUILD_WAIT_S")
    assert extension.build_wait_s() == extension.BUILD_WAIT_S
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("FLASHTUNE_BUILD_WAIT_S", bad)
        with pytest.raises(ValueError, match="FLASHTUNE_BUILD_WAIT_S"):
            extension.build_wait_s()


def test_prepare_reports_each_compiled_family_and_rejects_unknown_ones():
    rows = {row.family: row for row in ft.prepare()}
    assert set(rows) == {"cpu", "cuda"}
    assert rows["cpu"].status == "ready"  # this machine has a compiler (the suite's other tests need it)
    if not torch.cuda.is_available():
        assert rows["cuda"].status == "skipped" and "NVIDIA GPU" in rows["cuda"].detail
    assert [row.family for row in ft.prepare(["aten", "cpu"])] == ["cpu"]
    with pytest.raises(ValueError, match=r"unknown kernel families \['gpu'\]"):
        ft.prepare(["gpu"])


def test_cxx_standard_is_what_this_torchs_headers_require():
    from torch.utils.cpp_extension import include_paths

    header = next(Path(p) / "ATen" / "ATen.h" for p in include_paths() if (Path(p) / "ATen" / "ATen.h").exists())
    std = extension.cxx_standard()
    assert std in ("c++17", "c++20")
    assert f"__cplusplus < 20{std[3:]}" in header.read_text()
