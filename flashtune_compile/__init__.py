"""flashtune_compile: a torch.compile backend that routes matmul and MoE through tunable ops.

Library use without the compiler::

    import flashtune_compile as ft
    runner, tactic = ft.AutoTuner.get().choose_one("my_op", runners, config, inputs)

Every name in ``__all__`` documents itself (what it does, its arguments, what it raises, an
example). Two are constants: ``__version__``, this package's version, and ``DEFAULT_TACTIC`` (-1),
the tactic of a runner's default implementation, valid for every input.
"""

__version__ = "0.2.0"

from .logs import configure_from_env as _configure_logging

_configure_logging()

from . import passes as _passes  # noqa: E402,F401  (its passes register torch.ops.flashtune.*)
from .api import clear_cache, load_cache, prepare, reset_stats, save_cache, stats, tactics  # noqa: E402
from .artifacts import ArtifactError, load_artifacts, save_artifacts  # noqa: E402
from .backend import backend  # noqa: E402
from .freeze import FreezeReport, freeze, unfreeze  # noqa: E402
from .tuner import (  # noqa: E402
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
from .tuner.distributed import DistributedTuningError, set_process_group  # noqa: E402
from .warmup import WarmupReport, warmup  # noqa: E402

__all__ = [
    "__version__",
    "backend",
    "ArtifactError",
    "AutoTuner",
    "BucketProfile",
    "CacheFileError",
    "ConstraintSpec",
    "DEFAULT_TACTIC",
    "DistributedTuningError",
    "DynamicDim",
    "FreezeReport",
    "ProfilerSettings",
    "TunableRunner",
    "TuningConfig",
    "WarmupReport",
    "autotune",
    "clear_cache",
    "freeze",
    "load_artifacts",
    "load_cache",
    "prepare",
    "reset_stats",
    "save_artifacts",
    "save_cache",
    "set_process_group",
    "stats",
    "tactics",
    "unfreeze",
    "warmup",
]
