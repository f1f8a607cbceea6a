"""Candidate kernels. Each runner belongs to one *kernel family*; the ``kernels`` option names
the families a compiled model may choose from (ATen's default runner is always there)."""

# The kernel families, in the order the README lists them.
FAMILIES = (
    "aten",  # ATen formulations (cuBLAS / oneDNN underneath); the default runner of every op is here
    "triton",  # Triton kernels: CUDA, or the CPU under TRITON_INTERPRET=1 (tests)
    "cuda",  # hand-written CUDA kernels, built on first use
    "cpu",  # CPU tactics from re-laid-out weights
)
