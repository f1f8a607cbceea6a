"""flashtune_compile: a torch.compile backend that routes matmul and MoE through tunable ops.

Library use without the compiler::

    import flashtune_compile as ft
    runner, tactic = ft.AutoTuner.get().choose_one("my_op", runners, config, inputs)
"""

__version__ = "0.1.0"

from . import ops as _ops  # noqa: F401  (registers torch.ops.flashtune.*)
from .api import clear_cache, load_cache, reset_stats, save_cache, stats, tactics
from .backend import backend
from .tuner import (
    DEFAULT_TACTIC,
    AutoTuner,
    BucketProfile,
    CacheFileError,
    ConstraintSpec,
    DynamicDim,
    ProfilerSettings,
    TunableRunner,
    TuningConfig,
    autotune,
)

__all__ = ["__version__", "backend", "AutoTuner", "BucketProfile", "CacheFileError", "ConstraintSpec", "DEFAULT_TACTIC",
           "DynamicDim", "ProfilerSettings", "TunableRunner", "TuningConfig", "autotune", "clear_cache",
           "load_cache", "reset_stats", "save_cache", "stats", "tactics"]
