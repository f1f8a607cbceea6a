"""The tuner: buckets, runners, cache-first choice, profiling and the on-disk cache."""

from .autotuner import AutoTuner, Stats, autotune
from .buckets import ConstraintSpec, DynamicDim, TuningConfig, hybrid_ladder, make_ladder, pow2_ladder
from .cache import CacheFileError
from .profiler import ProfilerSettings
from .runner import DEFAULT_TACTIC, BucketProfile, Tactic, TunableRunner

__all__ = [
    "AutoTuner",
    "Stats",
    "autotune",
    "ConstraintSpec",
    "DynamicDim",
    "TuningConfig",
    "hybrid_ladder",
    "make_ladder",
    "pow2_ladder",
    "CacheFileError",
    "ProfilerSettings",
    "DEFAULT_TACTIC",
    "BucketProfile",
    "Tactic",
    "TunableRunner",
]
