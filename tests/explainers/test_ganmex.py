"""GANMEX: the translator trains on the one loop (exact resume), its output is the baseline IG uses
(completeness against that baseline), the comparison table, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.attribution import IntegratedGradients
from genxai.config import load_config
from genxai.data import get_dataset
from genxai.explainers.ganmex import (
    ClassTranslator,
    GANMEXConfig,
    GANMEXTrainer,
    baseline_methods,
    compare_baselines,
    ganmex_baseline,
    load_translator,
    runner_up,
    standard_baselines,
)
from genxai.models.classifier import SmallResNet, save_classifier

torch.set_num_threads(1)


@pytest.fixture
def classifier_dir(tmp_path):
    torch.manual_seed(0)
    return save_classifier(SmallResNet(classes=6, channels=3, width=2, image_size=8).eval(), tmp_path / "clf")


def _config(tmp_path, classifier_dir, iterations: int, name: str = "g") -> GANMEXConfig:
    return load_config(
        GANMEXConfig,
        None,
        [
            f"out_dir={tmp_path}",
            f"name={name}",
            f"classifier={classifier_dir}",
            "data.image_size=8",
            f"train.iterations={iterations}",
            "train.batch_size=8",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "train.cpu=true",
            "train.progress=false",
            "model.width=4",
            "model.blocks=1",
            "model.critic_width=4",
        ],
    )


def test_translator_trains_on_the_loop_and_resumes_exactly(tmp_path, classifier_dir):
    data = get_dataset("shapes", size=8, n=32, seed=0)
    whole = GANMEXTrainer(_config(tmp_path, classifier_dir, 4, "whole"), dataset=data)
    whole.fit()
    GANMEXTrainer(_config(tmp_path, classifier_dir, 4, "split"), dataset=data).fit(until=2)
    resumed = GANMEXTrainer(_config(tmp_path, classifier_dir, 4, "split"), dataset=data)
    assert resumed.resumed_from is not None and resumed.units == 2
    resumed.fit()
    a, b = whole.translator.state_dict(), resumed.translator.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_translator(tmp_path / "whole")
    assert all(torch.equal(loaded.state_dict()[k], a[k]) for k in a)
    header = (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0]
    assert {"class_ce", "l1", "cycle", "hit_rate"} <= set(header.split(","))


class _Planted(ClassTranslator):
    """Writes the requested class into every pixel: G(x, c) = c / 10."""

    def forward(self, x, target):
        return (target.float() / 10).view(-1, 1, 1, 1).expand_as(x).clone()


def test_baseline_is_the_translation_to_the_runner_up_class():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.rand(5, 3, 8, 8)
    target = model(x).argmax(1)
    logits = model(x).detach().clone()
    logits[torch.arange(5), target] = -1e9
    expected = logits.argmax(1)
    g = _Planted(channels=3, classes=4)
    base = ganmex_baseline(g, model, x, target, batch_size=2)
    assert torch.allclose(base[:, 0, 0, 0], expected.float() / 10)
    assert torch.equal(runner_up(model, x, target), expected)
    assert torch.allclose(ganmex_baseline(g, model, x, target, baseline_class=2), torch.full_like(x, 0.2))
    with pytest.raises(ValueError, match="baseline_class"):
        ganmex_baseline(g, model, x, target, baseline_class=7)
    with pytest.raises(ValueError, match="3-channel"):
        ganmex_baseline(g, model, x[:, :1], target)


def test_comparison_uses_each_baseline_and_ig_is_complete_against_it():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 64, 3)
    ).eval()
    x = torch.rand(4, 3, 8, 8)
    target = model(x).argmax(1)
    baselines = {"translated": torch.rand(4, 3, 8, 8), **standard_baselines(x)}
    assert set(baselines) == {"translated", "zero", "blur", "uniform"}
    records, maps = compare_baselines(
        model, x, target, baselines, methods=["ig", "occlusion"], options={"ig": {"steps": 64}}, steps=8
    )
    assert [(r["method"], r["baseline"]) for r in records][:4] == [("ig", b) for b in baselines]
    assert all(
        {"deletion_auc", "deletion_auc_blur", "insertion_auc", "average_drop"} <= set(r) for r in records
    )
    for name, base in baselines.items():  # completeness: sum of IG = f(x) - f(baseline)
        scores = model(x).gather(1, target[:, None]).squeeze(1) - model(base).gather(
            1, target[:, None]
        ).squeeze(1)
        assert torch.allclose(maps[("ig", name)].flatten(1).sum(1), scores.detach(), atol=2e-3, rtol=1e-3)
    direct = IntegratedGradients(model, steps=64)(x, target, baseline=baselines["uniform"]).sum(
        1, keepdim=True
    )
    assert torch.allclose(maps[("ig", "uniform")], direct, atol=1e-6)


def test_bad_input_is_a_clear_error(tmp_path, classifier_dir):
    assert {"integratedgradients", "occlusion"} <= set(baseline_methods())
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="takes no baseline"):
        compare_baselines(model, x, torch.zeros(2, dtype=torch.long), {"zero": x * 0}, methods=["gradcam"])
    with pytest.raises(ValueError, match="shape"):
        compare_baselines(model, x, torch.zeros(2, dtype=torch.long), {"zero": torch.zeros(2, 3, 4, 4)})
    data = get_dataset("shapes", size=16, n=16, seed=0)  # the classifier takes 8 px images
    cfg = _config(tmp_path, classifier_dir, 2)
    cfg.data.image_size = 16
    with pytest.raises(ValueError, match="classifier: it takes 3x8x8"):
        GANMEXTrainer(cfg, dataset=data)
    with pytest.raises(ValueError, match=r"train\.l1_weight"):
        load_config(GANMEXConfig, None, ["train.l1_weight=-1"])
    with pytest.raises(FileNotFoundError, match="no GANMEX checkpoint"):
        load_translator(tmp_path / "nothing")


def test_job_writes_the_table_figure_and_report(tmp_path, classifier_dir):
    from genxai.jobs.counterfactual import run_ganmex

    overrides = ["data.image_size=8", "train.iterations=2", "train.batch_size=8", "train.progress=false"]
    overrides += ["model.width=4", "model.blocks=1", "model.critic_width=4"]
    report, records = run_ganmex(
        tmp_path / "g",
        overrides=overrides,
        classifier=classifier_dir,
        images=3,
        curve_steps=4,
        ig_steps=4,
        device="cpu",
    )
    assert report.is_file() and "GANMEX baselines" in report.read_text()
    assert (tmp_path / "g" / "ganmex_baselines.png").is_file() and (
        tmp_path / "g" / "baselines.json"
    ).is_file()
    assert [r["baseline"] for r in records] == ["ganmex", "zero", "blur", "uniform"]
