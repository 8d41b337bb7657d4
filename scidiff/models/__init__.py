"""Models (nn.Modules): the preconditioning, the score network, the condition encoder, the detection
model and the ``ScIDiffModel`` facade; the noise schedules (:mod:`scidiff.diffusion.schedules`)
are re-exported under their original names."""
from .conditioning import ConditionEncoder
from .diffusion_model import ScIDiffModel
from .preconditioning import Preconditioning
from .noise_scheduler import (BiologicalNoiseScheduler, CosineNoiseScheduler, LinearNoiseScheduler,
                              NoiseScheduler, get_scheduler)
from .score_network import ScoreNetwork

__all__ = ["BiologicalNoiseScheduler", "ConditionEncoder", "CosineNoiseScheduler", "LinearNoiseScheduler",
           "NoiseScheduler", "Preconditioning", "ScIDiffModel", "ScoreNetwork", "get_scheduler"]
