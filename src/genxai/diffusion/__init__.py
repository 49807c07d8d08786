"""XAI-guided diffusion: noise schedule, UNet, discriminator, saliency-shaped noise, samplers, the cycle;
diffusers models in (``from_diffusers``) and runs out (``export_run``)."""

from genxai.diffusion.ablation import run_ablation
from genxai.diffusion.config import ExperimentConfig, load_experiment
from genxai.diffusion.cycle import CycleSchedule, Position
from genxai.diffusion.discriminator import Discriminator, d_loss
from genxai.diffusion.guidance import (
    DiscriminatorGuidance,
    anneal_weight,
    discriminator_guidance,
    noise_weight,
    saliency,
)
from genxai.diffusion.hooked import DiffusersUNet
from genxai.diffusion.interop import Imported, export_run, from_diffusers
from genxai.diffusion.pipeline import LoadedRun, load_run, sample_run
from genxai.diffusion.sampling import SaliencyConditioned, ddim_sample, ddpm_sample
from genxai.diffusion.schedule import NoiseSchedule
from genxai.diffusion.trainer import GuidedDiffusionStep, Trainer
from genxai.diffusion.unet import UNet

__all__ = [
    "CycleSchedule",
    "DiffusersUNet",
    "Discriminator",
    "DiscriminatorGuidance",
    "ExperimentConfig",
    "GuidedDiffusionStep",
    "Imported",
    "LoadedRun",
    "NoiseSchedule",
    "Position",
    "SaliencyConditioned",
    "Trainer",
    "UNet",
    "anneal_weight",
    "d_loss",
    "ddim_sample",
    "ddpm_sample",
    "discriminator_guidance",
    "export_run",
    "from_diffusers",
    "load_experiment",
    "load_run",
    "noise_weight",
    "run_ablation",
    "saliency",
    "sample_run",
]
