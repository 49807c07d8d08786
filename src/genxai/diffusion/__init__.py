"""XAI-guided diffusion: noise schedule, UNet, discriminator, saliency-shaped noise, samplers, the cycle."""

from genxai.diffusion.cycle import CycleSchedule, Position
from genxai.diffusion.schedule import NoiseSchedule
from genxai.diffusion.unet import UNet

__all__ = ["CycleSchedule", "NoiseSchedule", "Position", "UNet"]
