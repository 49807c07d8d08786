"""A small GAN to explain, trained for real: a DCGAN generator with named blocks (for dissection)
and discriminator, its typed config, the training step on the project's loop, and a trained run
as a pipeline (load the EMA generator, sample it with seeded latents)."""

from genxai.gan.config import GANConfig, build_dataset, build_discriminator, build_generator, load_gan_config
from genxai.gan.losses import DiscriminatorLoss, discriminator_loss, generator_loss
from genxai.gan.models import LATENT_CHUNK, Discriminator, Generator
from genxai.gan.pipeline import (
    LoadedGAN,
    latent_batches,
    load_discriminator,
    load_gan_run,
    load_generator,
    sample,
)
from genxai.gan.trainer import GANStep, GANTrainer

__all__ = [
    "LATENT_CHUNK",
    "Discriminator",
    "DiscriminatorLoss",
    "GANConfig",
    "GANStep",
    "GANTrainer",
    "Generator",
    "LoadedGAN",
    "build_dataset",
    "build_discriminator",
    "build_generator",
    "discriminator_loss",
    "generator_loss",
    "latent_batches",
    "load_discriminator",
    "load_gan_config",
    "load_gan_run",
    "load_generator",
    "sample",
]
