"""Generative models and examples as explainers of a classifier: GANMEX baselines, diffeomorphic
counterfactuals (a RealNVP's latent), example-based and concept explanations, influence."""

from genxai.explainers.counterfactuals import (
    compare_counterfactuals,
    latent_counterfactual,
    pixel_counterfactual,
)
from genxai.explainers.examples import ExampleExplainer, layer_features, mmd_critic
from genxai.explainers.flows import FlowTrainer, RealNVP, load_flow
from genxai.explainers.ganmex import GANMEXTrainer, compare_baselines, ganmex_baseline, load_translator
from genxai.explainers.influence import ClassifierStep, InfluenceFunction, tracin
from genxai.explainers.tcav import TCAV, train_cav

__all__ = [
    "TCAV",
    "ClassifierStep",
    "ExampleExplainer",
    "FlowTrainer",
    "GANMEXTrainer",
    "InfluenceFunction",
    "RealNVP",
    "compare_baselines",
    "compare_counterfactuals",
    "ganmex_baseline",
    "latent_counterfactual",
    "layer_features",
    "load_flow",
    "load_translator",
    "mmd_critic",
    "pixel_counterfactual",
    "tracin",
    "train_cav",
]
