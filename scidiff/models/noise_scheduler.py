"""The original design's address of the noise schedules, which live in :mod:`scidiff.diffusion.schedules`."""
from ..diffusion.schedules import (SCHEDULERS, BiologicalNoiseScheduler, CosineNoiseScheduler, LinearNoiseScheduler,
                                   NoiseScheduler, get_scheduler)

__all__ = ["SCHEDULERS", "BiologicalNoiseScheduler", "CosineNoiseScheduler", "LinearNoiseScheduler", "NoiseScheduler",
           "get_scheduler"]
