"""The one training loop every generative model in genxai trains with (diffusion, GANs, flows).

A method is a :class:`TrainStep` (its models, one iteration, its periodic events); the
:class:`Loop` adds Accelerate, EMA, atomic checkpoints with exact resume, SIGTERM save, the NaN
stop, logging and the progress bar. See :mod:`genxai.training.loop`.
"""

from genxai.training.ema import EMA
from genxai.training.loop import Loop, LoopConfig, NonFiniteLossError
from genxai.training.step import Event, TrainStep

__all__ = ["EMA", "Event", "Loop", "LoopConfig", "NonFiniteLossError", "TrainStep"]
