"""TCAV: a planted concept is significant and a random one is not; agreement with Captum's TCAV."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.explainers.tcav import TCAV, directional_derivatives, train_cav


class Planted(nn.Module):
    """``enc``: a 1x1 conv copying the 3 channels (then ReLU); class 0's logit rises with channel 0
    (the planted "red" concept), class 1's with channel 1; a nonlinear head so gradients vary."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        with torch.no_grad():
            self.enc[0].weight.copy_(torch.eye(3)[:, :, None, None])
            self.enc[0].bias.zero_()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.enc(x)
        m = self.pool(a).flatten(1)
        red = nn.functional.softplus(4 * (a[:, 0] - a[:, 1])).mean((1, 2)) + 0.3 * (a[:, 2] ** 2).mean((1, 2))
        return torch.stack([red, m[:, 1] - m[:, 2]], 1)


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_cav_points_to_the_concept():
    concept, random = torch.randn(40, 5) + torch.tensor([2.0, 0, 0, 0, 0]), torch.randn(40, 5)
    cav = train_cav(concept, random)
    assert abs(float(cav.norm()) - 1) < 1e-5 and int(cav.abs().argmax()) == 0 and cav[0] > 0


def test_planted_concept_is_significant_and_random_concept_is_not():
    model = Planted().eval()
    randoms = [_noise(30, seed) for seed in range(10)]
    tcav = TCAV(model, "enc", randoms, alpha=0.05)
    red = _noise(30, 100)
    red[:, 0] += 1.0
    images = _noise(40, 200)
    results = {r.name: r for r in tcav.interpret(images, 0, {"red": red, "random": _noise(30, 300)})}
    assert results["red"].significant and results["red"].score > 0.9
    assert results["red"].pvalue < 0.05 / 2
    assert not results["random"].significant
    assert results["random"].pvalue > 0.05 / 2
    assert min(results["red"].cav_accuracy) > 0.9


def test_directional_derivative_matches_autograd_by_hand():
    model = Planted().eval()
    x = _noise(5, 1)
    cavs = torch.randn(2, 3 * 6 * 6)
    got = directional_derivatives(model, x, "enc", 0, cavs, batch_size=2)
    rows = []
    for i in range(5):
        act = model.enc(x[i : i + 1]).detach().requires_grad_(True)
        logit = nn.functional.softplus(4 * (act[:, 0] - act[:, 1])).mean((1, 2)) + 0.3 * (
            act[:, 2] ** 2
        ).mean((1, 2))
        (g,) = torch.autograd.grad(logit.sum(), act)
        rows.append(g.flatten() @ cavs.T)
    assert torch.allclose(got, torch.stack(rows), atol=1e-5)


def test_empty_concept_set_unknown_class_and_too_few_random_sets_are_clear_errors():
    model = Planted().eval()
    tcav = TCAV(model, "enc", [_noise(8, 0), _noise(8, 1)])
    with pytest.raises(ValueError, match=r"concepts\['empty'\]: the concept set is empty"):
        tcav.interpret(_noise(4, 2), 0, {"empty": torch.empty(0, 3, 6, 6)})
    with pytest.raises(ValueError, match="target: unknown class 7"):
        tcav.interpret(_noise(4, 2), 7, {"c": _noise(8, 3)})
    with pytest.raises(ValueError, match="concepts: no concept sets"):
        tcav.interpret(_noise(4, 2), 0, {})
    with pytest.raises(ValueError, match="random_sets: the significance test needs at least 2"):
        TCAV(model, "enc", [_noise(8, 0)])


def test_agrees_with_captum_tcav_on_the_same_cavs(tmp_path):
    """Captum computes the activations, trains through our CAV classifier and scores; the TCAV
    (sign-count) scores must equal ours for every (concept, random) pair."""
    pytest.importorskip("captum")
    from captum.concept import TCAV as CaptumTCAV
    from captum.concept import Concept
    from captum.concept._utils.classifier import Classifier

    class OurCav(Classifier):
        def __init__(self) -> None:
            self.ids, self.cav = [], None

        def train_and_eval(self, dataloader, **kwargs):
            xs, ys = zip(*dataloader)
            x, y = torch.cat(xs), torch.cat(ys)
            self.ids = sorted(set(y.tolist()))  # [concept id, random id]: concept ids are smaller
            self.cav = train_cav(x[y == self.ids[0]], x[y == self.ids[1]])
            return {}

        def weights(self):
            return torch.stack([self.cav, -self.cav])

        def classes(self):
            return self.ids

    torch.manual_seed(0)
    from genxai.models.classifier import SmallResNet

    model = SmallResNet(classes=3, channels=3, width=4, image_size=8).eval()
    concept = torch.rand(12, 3, 8, 8) + torch.tensor([0.8, 0, 0])[:, None, None]
    randoms = [torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    images = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(9))

    def as_concept(i, name, data):
        return Concept(i, name, torch.utils.data.DataLoader(list(data), batch_size=64))

    c_concept = as_concept(0, "red", concept)
    c_randoms = [as_concept(i + 1, f"random{i}", r) for i, r in enumerate(randoms)]
    peer = CaptumTCAV(model, ["layer2"], classifier=OurCav(), save_path=str(tmp_path))
    got = peer.interpret(images, [[c_concept, r] for r in c_randoms], target=1)
    theirs = torch.stack([got[f"0-{r.id}"]["layer2"]["sign_count"][0] for r in c_randoms]).cpu()

    ours = TCAV(model, "layer2", randoms, batch_size=4)
    cavs, _ = ours.concept_cavs(concept)
    mine = ours.scores(images, 1, cavs)
    assert torch.allclose(mine, theirs.float(), atol=1e-6)
