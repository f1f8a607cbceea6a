"""The tuner: buckets, runners, cache-first choice, profiling, the on-disk cache, and the process
state it owns (sites, runner sets, weight copies, generators)."""

from .autotuner import AutoTuner, Stats, autotune
from .buckets import ConstraintSpec, DynamicDim, TuningConfig, hybrid_ladder, make_ladder, pow2_ladder
from .cache import CacheFileError
from .profiler import ProfilerSettings
from .runner import DEFAULT_TACTIC, BucketProfile, DefaultOnly, Tactic, TunableRunner

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
    "DefaultOnly",
    "Tactic",
    "TunableRunner",
]
