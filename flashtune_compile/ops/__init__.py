"""Custom ops in the ``flashtune`` namespace (``torch.ops.flashtune.*``): each has a fake
implementation for Dynamo/AOTAutograd/Inductor, an autograd formula, and names its candidates."""

from . import matmul  # noqa: F401  (registers the ops)
from .matmul import MATMUL_OPS, SiteSpec

__all__ = ["MATMUL_OPS", "SiteSpec"]
