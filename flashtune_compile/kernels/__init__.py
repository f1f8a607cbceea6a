"""Candidate kernels. Each runner belongs to one *kernel family*; the ``kernels`` option names
the families a compiled model may choose from (ATen's default runner is always there)."""

import functools

import torch

# The kernel families, in the order the README lists them.
FAMILIES = (
    "aten",  # ATen formulations (cuBLAS / oneDNN underneath); the default runner of every op is here
    "triton",  # Triton kernels: CUDA, or the CPU under TRITON_INTERPRET=1 (tests)
    "cuda",  # hand-written CUDA kernels, built on first use
    "cpu",  # CPU tactics from re-laid-out weights
)


def sm_count(x: torch.Tensor) -> int:
    """Multiprocessors of x's GPU, read once per device (132, an H100's, for a CPU tensor: the
    Triton interpreter's stand-in in tests)."""
    return _sm_count(x.get_device()) if x.is_cuda else 132


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
