"""Models: the score network, condition encoder, noise schedules and the ``ScIDiffModel`` facade."""
from .conditioning import ConditionEncoder
from .diffusion_model import ScIDiffModel
from .noise_scheduler import (BiologicalNoiseScheduler, CosineNoiseScheduler, LinearNoiseScheduler,
                              NoiseScheduler, get_scheduler)
from .score_network import ScoreNetwork

__all__ = ["BiologicalNoiseScheduler", "ConditionEncoder", "CosineNoiseScheduler", "LinearNoiseScheduler",
           "NoiseScheduler", "ScIDiffModel", "ScoreNetwork", "get_scheduler"]
