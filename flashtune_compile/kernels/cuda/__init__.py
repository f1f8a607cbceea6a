"""Hand-written CUDA kernels, built on first use with ``torch.utils.cpp_extension.load_inline``.

Nothing is compiled or imported at package import: ``load_skinny_gemm()`` builds the extension the
first time it is called (thread-safe, memoized for the process), about 90 s, once per machine:
``extension.built_module`` keeps the build under a name that hashes the sources, flags and torch
version, and never hangs on a build another process left unfinished.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..extension import BuiltOnce, build_name, built_module, cxx_standard

SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "skinny_gemm.cu")
BINDING_PATH = os.path.join(os.path.dirname(SOURCE_PATH), "skinny_binding.cu")  # the torch side

# IEEE arithmetic on purpose: no --use_fast_math. The C++ standard is the one this torch's headers need.
EXTRA_CUDA_CFLAGS = ("-O3", f"-std={cxx_standard()}")

CPP_SOURCE = (
    "std::string skinny_linear_out(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,"
    " at::Tensor& y, const std::optional<at::Tensor>& workspace, int64_t threads, int64_t n_per_block,"
    " int64_t split_k);"
)


def skinny_gemm_sources() -> tuple[str, str]:
    """(cpp_source, cuda_source) exactly as given to ``load_inline``."""
    with open(SOURCE_PATH, encoding="utf-8") as f, open(BINDING_PATH, encoding="utf-8") as g:
        return CPP_SOURCE, f.read() + "\n" + g.read()


def extension_name(cpp_source: str, cuda_source: str) -> str:
    """``flashtune_skinny_gemm_<hash>``: a new name (a new build) whenever the sources, the flags or
    the torch and CUDA versions (whose headers and ABI the binary follows) change."""
    versions = f"torch {torch.__version__} cuda {torch.version.cuda}"
    return build_name("flashtune_skinny_gemm", cpp_source, cuda_source, *EXTRA_CUDA_CFLAGS, versions)


class SkinnyGemm:
    """The built extension behind ``skinny_linear``: this side allocates the output (and the split-K
    workspace); the extension checks every argument and returns a message instead of throwing."""

    def __init__(self, extension: Any) -> None:
        self.extension = extension

    def skinny_linear(self, x: Any, w: Any, b: Any, threads: int, n_per_block: int, split_k: int) -> Any:
        """``x @ w.T + b`` for x [M <= 16, K], w [N, K] contiguous; RuntimeError naming the bad argument."""
        if x.dim() != 2 or w.dim() != 2:
            raise RuntimeError(
                f"skinny_linear: expected x [M, K] and w [N, K], got {list(x.shape)} and {list(w.shape)}"
            )
        m, n = x.shape[0], w.shape[0]
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        workspace = None
        if split_k in (2, 4, 8) and 0 < m <= 16 and n > 0:
            workspace = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
        error = self.extension.skinny_linear_out(x, w, b, y, workspace, threads, n_per_block, split_k)
        if error:
            raise RuntimeError(error)
        return y


def _require_cuda() -> None:
    """RuntimeError saying why, unless this torch has CUDA and a GPU is visible."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise RuntimeError(
            "the CUDA skinny GEMM kernel needs a CUDA build of torch and an NVIDIA GPU "
            f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
            f"cuda available={torch.cuda.is_available()})"
        )


def _build() -> SkinnyGemm:
    from torch.utils.cpp_extension import load_inline

    cpp_source, cuda_source = skinny_gemm_sources()
    name = extension_name(cpp_source, cuda_source)

    def compile_into(directory: str) -> Any:
        return load_inline(
            name=name,
            cpp_sources=[cpp_source],
            cuda_sources=[cuda_source],
            functions=["skinny_linear_out"],
            extra_cuda_cflags=list(EXTRA_CUDA_CFLAGS),
            build_directory=directory,
            verbose=False,
        )

    return SkinnyGemm(built_module("CUDA skinny GEMM kernel", name, compile_into, about_s=90))


_built = BuiltOnce("CUDA skinny GEMM kernel", _build)


def load_skinny_gemm() -> SkinnyGemm:
    """The compiled extension behind ``.skinny_linear(x, w, b | None, threads, n_per_block, split_k)``.

    Builds on first call, at most once per process; a failed build is remembered and re-raised.
    RuntimeError when this torch has no CUDA or no GPU is visible."""
    _require_cuda()  # checked on every call, not remembered as a failed build
    return _built.get()
