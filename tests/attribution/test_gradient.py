import pytest
import torch
from torch import nn

from genxai.attribution import InputXGradient, IntegratedGradients, Saliency, SmoothGrad, get
from genxai.targets import Fake


class SmoothNet(nn.Module):
    """A smooth (tanh) net, so IG's quadrature converges fast enough for a 1e-3 completeness check."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


def test_saliency_of_linear_model_is_abs_weight():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    maps = Saliency(linear)(x, target=3)
    expected = linear[1].weight[3].abs().view(1, 3, 4, 4).expand(2, -1, -1, -1)
    assert torch.allclose(maps, expected)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_completeness(method):
    torch.manual_seed(0)
    model = SmoothNet().eval()
    x = torch.rand(3, 3, 8, 8)
    target = torch.tensor([0, 2, 3])
    attributions = IntegratedGradients(model, steps=64, method=method, internal_batch_size=50)(
        x, target=target
    )
    with torch.no_grad():
        gap = model(x).gather(1, target[:, None])[:, 0] - model(torch.zeros_like(x))[:, target].diagonal()
    assert torch.allclose(attributions.flatten(1).sum(1), gap, rtol=1e-3, atol=1e-6)


def test_internal_batch_size_does_not_change_result(gapnet, images):
    a = IntegratedGradients(gapnet, steps=10, internal_batch_size=3)(images, target=1)
    b = IntegratedGradients(gapnet, steps=10, internal_batch_size=100)(images, target=1)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.peers
def test_agreement_with_captum(gapnet, images):
    captum = pytest.importorskip("captum.attr")
    target = torch.tensor([0, 1, 2, 3])
    ours = Saliency(gapnet)(images, target=target)
    theirs = captum.Saliency(gapnet).attribute(images, target=target)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours = InputXGradient(gapnet)(images, target=target)
    theirs = captum.InputXGradient(gapnet).attribute(images, target=target)
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours = IntegratedGradients(gapnet, steps=20)(images, target=target)
    theirs = captum.IntegratedGradients(gapnet).attribute(images, target=target, n_steps=20)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # Captum's trapezoid weights are 1/n (they sum to (n-1)/n); ours are the textbook 1/(n-1).
    ours = IntegratedGradients(gapnet, steps=20, method="riemann_trapezoid")(images, target=target)
    theirs = captum.IntegratedGradients(gapnet).attribute(
        images, target=target, n_steps=20, method="riemann_trapezoid"
    )
    assert torch.allclose(ours * 19 / 20, theirs, atol=1e-5)


@pytest.mark.peers
def test_discriminator_agreement_with_captum(discriminator, images):
    captum = pytest.importorskip("captum.attr")
    ours = Saliency(discriminator)(images, target=Fake())
    theirs = captum.Saliency(lambda x: -discriminator(x)).attribute(images)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_smoothgrad_is_seeded_and_averages(gapnet, images):
    a = SmoothGrad(gapnet, samples=8, seed=3, internal_batch_size=5)(images, target=1)
    b = SmoothGrad(gapnet, samples=8, seed=3, internal_batch_size=32)(images, target=1)
    assert torch.allclose(a, b, atol=1e-6)
    zero_noise = SmoothGrad(gapnet, samples=4, sigma=0.0)(images, target=1)
    assert torch.allclose(zero_noise, Saliency(gapnet)(images, target=1), atol=1e-6)


def test_bad_input_errors(gapnet, images):
    with pytest.raises(ValueError, match="x: expected shape"):
        Saliency(gapnet)(images[0])
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        Saliency(gapnet)(images.long())
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains 1 NaN"):
        Saliency(gapnet)(bad)
    with pytest.raises(ValueError, match="target: class 9 out of range"):
        Saliency(gapnet)(images, target=9)
    with pytest.raises(ValueError, match="steps"):
        IntegratedGradients(gapnet, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        IntegratedGradients(gapnet)(images, target=1, baseline=torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"baseline: contains .* NaN"):
        IntegratedGradients(gapnet)(
            images, target=1, baseline=torch.tensor([float("nan"), 0.0, 0.0]).view(1, 3, 1, 1)
        )
    assert all(not m._forward_hooks for m in gapnet.modules())


def test_registry_lookup():
    assert get("Integrated-Gradients") is IntegratedGradients
    with pytest.raises(ValueError, match="Did you mean"):
        get("saliencyy")


def test_results_stay_float32_and_normalized(gapnet, images):
    maps = Saliency(gapnet, normalize=True)(images.double().float(), target=0)
    assert maps.dtype == torch.float32
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(4))
