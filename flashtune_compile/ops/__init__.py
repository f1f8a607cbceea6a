"""Custom ops in the ``flashtune`` namespace (``torch.ops.flashtune.*``): each has a fake
implementation for Dynamo/AOTAutograd/Inductor, an autograd rule, and names its candidates."""

from . import matmul, moe
from .matmul import MATMUL_OPS
from .moe import MOE_OPS
from .site import KERNEL_FAMILIES, SiteSpec, runners_for

# op overload -> its Autograd-key kernel as a plain callable (graphs run as they are call it directly)
DIRECT = {**matmul.DIRECT, **moe.DIRECT}

__all__ = ["DIRECT", "KERNEL_FAMILIES", "MATMUL_OPS", "MOE_OPS", "SiteSpec", "runners_for"]
