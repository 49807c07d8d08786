"""Diffeomorphic counterfactuals: the RealNVP is a bijection with the exact log-determinant, trains
on the one loop with exact resume; latent counterfactuals reach the target and stay more likely
under the flow than pixel-space ones on the same images; bad input is a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from genxai.cli import app
from genxai.data import get_dataset
from genxai.explainers.counterfactuals import compare_counterfactuals, latent_counterfactual, target_classes
from genxai.explainers.flows import FlowConfig, FlowTrainer, RealNVP, load_flow, load_flow_config
from genxai.explainers.ganmex import runner_up
from genxai.jobs.counterfactual import class_index
from genxai.models.classifier import SmallResNet, save_classifier

torch.set_num_threads(1)

TINY = [
    "data.name=digits",
    "data.image_size=8",
    "data.random_flip=false",
    "model.levels=2",
    "model.hidden=16",
]
LOOP = [
    "train.batch_size=64",
    "train.progress=false",
    "train.cpu=true",
    "train.log_every=25",
    "train.warmup=10",
]


def _flow_config(tmp_path, name: str, iterations: int, extra=()) -> FlowConfig:
    options = [f"out_dir={tmp_path}", f"name={name}", f"train.iterations={iterations}", *TINY, *LOOP, *extra]
    return load_flow_config(None, ["model.couplings=2", "train.lr=5e-3", *options])


def test_flow_is_a_bijection_with_the_exact_log_determinant():
    torch.manual_seed(0)
    flow = RealNVP(channels=1, image_size=4, levels=2, hidden=8, couplings=1).double()
    for p in flow.parameters():  # move off the identity start
        p.data += 0.1 * torch.randn_like(p)
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(
        lambda v: flow.encode(v.view(1, 1, 4, 4)).view(-1), x.view(-1)
    )
    assert torch.allclose(flow.encode_with_logdet(x)[1], torch.slogdet(jacobian)[1], atol=1e-8)
    wide = RealNVP(channels=3, image_size=16, levels=3, hidden=8, couplings=2)
    images = torch.rand(3, 3, 16, 16)
    z = wide.encode(images)
    assert z.shape == (3, 768)
    assert torch.allclose(wide.decode(z), images, atol=1e-5)
    # log-density of a change of variables from the standard normal
    assert torch.allclose(
        wide.log_prob(images),
        -0.5 * (z.square() + torch.log(torch.tensor(2 * torch.pi))).sum(1)
        + wide.encode_with_logdet(images)[1],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A RealNVP on 8x8 digits (150 loop iterations, seconds) and a confident linear classifier."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("flow")
    data = get_dataset("digits", size=8)
    FlowTrainer(_flow_config(tmp, "f", 150), dataset=data).fit()
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(clf.parameters(), 0.05)
    for _ in range(200):
        loss = F.cross_entropy(clf(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = get_dataset("digits", size=8, train=False)
    return (
        load_flow(tmp / "f"),
        clf.eval().requires_grad_(False),
        torch.stack([test[i][0] for i in range(8)]),
        tmp,
    )


def test_latent_counterfactual_reaches_the_target_and_stays_more_likely_than_pixel_steps(trained):
    flow, clf, x, _ = trained
    goal = runner_up(clf, x, clf(x).argmax(1))
    results, records = compare_counterfactuals(flow, clf, x, goal, max_steps=300)
    latent, pixel = results["latent (flow)"], results["pixel (adversarial)"]
    assert latent.success.all() and (clf(latent.images).argmax(1) == goal).all()
    assert (latent.probability > 0.99).all() and (latent.steps < 300).all()
    assert (latent.bits_per_dim < pixel.bits_per_dim).all(), (latent.bits_per_dim, pixel.bits_per_dim)
    assert torch.allclose(latent.bits_per_dim, flow.bits_per_dim(latent.images))
    assert [r["method"] for r in records] == ["original images", "latent (flow)", "pixel (adversarial)"]
    # a stricter threshold needs at least as many steps; images already of the class need none
    again = latent_counterfactual(flow, clf, x, goal, threshold=0.999, max_steps=150)
    assert (again.steps >= latent.steps).all()
    own = latent_counterfactual(flow, clf, x, clf(x).argmax(1), threshold=0.5)
    assert (own.steps == 0).all() and torch.allclose(own.images, x.clamp(0, 1), atol=1e-4)


def test_flow_trains_on_the_loop_and_resumes_exactly(tmp_path):
    data = get_dataset("digits", size=8)
    whole = FlowTrainer(_flow_config(tmp_path, "whole", 4, ["train.checkpoint_every=2"]), dataset=data)
    whole.fit()
    FlowTrainer(_flow_config(tmp_path, "split", 4, ["train.checkpoint_every=2"]), dataset=data).fit(until=2)
    resumed = FlowTrainer(_flow_config(tmp_path, "split", 4, ["train.checkpoint_every=2"]), dataset=data)
    assert resumed.units == 2
    resumed.fit()
    a, b = whole.flow.state_dict(), resumed.flow.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "bpd" in (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[0]


def test_bad_input_is_a_clear_error(trained, tmp_path):
    flow, clf, x, _ = trained
    with pytest.raises(ValueError, match=r"classes 0\.\.9"):
        target_classes(clf, x, 12)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 8, 8\)"):
        latent_counterfactual(flow, clf, torch.rand(2, 1, 16, 16), 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        RealNVP(channels=1, image_size=10, levels=3)
    with pytest.raises(ValueError, match=r"model\.levels"):
        load_flow_config(None, ["data.image_size=16", "model.levels=5"])
    with pytest.raises(ValueError, match=r"unknown class 'hexagon'.*0=circle"):
        class_index("hexagon", 6, ["circle", "square", "triangle", "cross", "ring", "diamond"])
    assert class_index("ring", 6, ["circle", "square", "triangle", "cross", "ring", "diamond"]) == 4
    assert class_index("2", 3, []) == 2
    with pytest.raises(FileNotFoundError, match="no flow checkpoint"):
        load_flow(tmp_path)


def test_cli_reports_bad_input_in_one_line(tmp_path):
    folder = save_classifier(SmallResNet(classes=6, channels=3, width=2, image_size=16), tmp_path / "clf")
    runner = CliRunner()
    base = ["counterfactual", "--out", str(tmp_path / "cf"), "--classifier", str(folder), "--device", "cpu"]
    for extra, message in (
        (["--target", "hexagon"], "unknown class 'hexagon'"),
        (["model.levels=5"], "model.levels"),
        (["--threshold", "1.5"], "--threshold"),
        (["data.image_size=32"], "takes 3x16px"),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    result = runner.invoke(
        app, ["ganmex", "--out", str(tmp_path / "g"), "--classifier", str(tmp_path / "none")]
    )
    assert result.exit_code == 2 and "no saved classifier" in result.output
    result = runner.invoke(app, ["ganmex", "--out", str(tmp_path / "g2"), "--method", "gradcam"])
    assert result.exit_code == 2 and "'gradcam' takes no baseline" in result.output
    assert not (tmp_path / "g2").exists()  # rejected before any training


def test_job_writes_the_table_figures_and_report(tmp_path):
    from genxai.jobs.counterfactual import run_counterfactual

    torch.manual_seed(0)
    folder = save_classifier(SmallResNet(classes=10, channels=1, width=2, image_size=8), tmp_path / "clf")
    overrides = [
        *TINY,
        "model.couplings=1",
        "train.iterations=2",
        "train.batch_size=16",
        "train.progress=false",
    ]
    report, records = run_counterfactual(
        tmp_path / "cf", overrides=overrides, classifier=folder, images=3, max_steps=2, device="cpu"
    )
    assert report.is_file() and "Diffeomorphic counterfactuals" in report.read_text()
    for name in ("counterfactuals.png", "counterfactual_likelihood.png", "counterfactuals.json", "flow.yaml"):
        assert (tmp_path / "cf" / name).is_file()
    assert [r["method"] for r in records] == ["original images", "latent (flow)", "pixel (adversarial)"]
    assert all(r["steps"] <= 2 for r in records)
