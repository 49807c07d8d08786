import pytest
import torch

from genxai.core.engine import batched_scores, forward_backward
from genxai.core.targets import ClassLogit, Fake, as_target


def test_gradients_match_autograd(gapnet, images):
    target = ClassLogit(torch.tensor([0, 1, 2, 3]))
    result = forward_backward(gapnet, images, target, layers=["features.2"])
    x = images.clone().requires_grad_(True)
    out = gapnet(x)
    (grad,) = torch.autograd.grad(out.gather(1, torch.tensor([[0], [1], [2], [3]])).sum(), x)
    assert torch.allclose(result.input_grad, grad, atol=1e-6)
    assert result.activations["features.2"].shape == result.gradients["features.2"].shape
    assert all(p.grad is None for p in gapnet.parameters())


def test_discriminator_inplace_leaky_relu(discriminator, images):
    result = forward_backward(discriminator, images, Fake(), layers=["main.2"])
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(-discriminator(x).sum(), x)
    assert torch.allclose(result.input_grad, grad, atol=1e-6)


def test_layer_not_called_and_no_gradient(gapnet, images):
    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(3, 2)
            self.unused = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="layer: 'unused' was not called"):
        forward_backward(Skip(), images, as_target(0), layers=["unused"])


def test_batched_scores_chunking_is_exact(gapnet, images):
    target = ClassLogit(torch.tensor([0, 1, 2, 3]))
    copies = 5

    def make_batch(start, stop):
        rows = torch.arange(start, stop)
        image = rows // copies
        return images[image] * (rows % copies + 1).view(-1, 1, 1, 1) / copies, image

    a = batched_scores(gapnet, make_batch, 4 * copies, target, batch_size=3)
    b = batched_scores(gapnet, make_batch, 4 * copies, target, batch_size=64)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(
        a[copies - 1 :: copies], gapnet(images).gather(1, target.index[:, None])[:, 0], atol=1e-5
    )


def test_result_is_gradients_and_the_name_pass_is_gone():
    import genxai.core as core
    import genxai.core.engine as engine

    assert core.Gradients is engine.Gradients
    assert not hasattr(engine, "Pass") and "Pass" not in core.__all__


def test_output_relevance_seeds_the_backward_with_the_explained_logit(gapnet, images):
    target = ClassLogit(torch.tensor([0, 1, 2, 3]))
    plain = forward_backward(gapnet, images, target, layers=["features.2"])
    seeded = forward_backward(gapnet, images, target, layers=["features.2"], output_relevance=True)
    logit = plain.scores.view(-1, 1, 1, 1)  # grad of (onehot * out) = logit * d logit / d x
    torch.testing.assert_close(seeded.input_grad, logit * plain.input_grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(
        seeded.gradients["features.2"], logit * plain.gradients["features.2"], rtol=1e-5, atol=1e-8
    )
    torch.testing.assert_close(seeded.scores, plain.scores)


def test_context_is_entered_around_forward_and_backward_and_left_on_errors(gapnet, images):
    events = []

    class Recording:
        def __init__(self, model):
            self.model = model

        def __enter__(self):
            events.append(("enter", self.model))
            return self.model

        def __exit__(self, *exc):
            events.append(("exit", exc[0]))
            return False

    def doubled(output):
        output.register_hook(lambda grad: events.append(("backward", None)))  # runs in the backward
        return output[:, 0] * 2

    result = forward_backward(gapnet, images, as_target(doubled), context=Recording)
    assert events == [("enter", gapnet), ("backward", None), ("exit", None)]
    reference = forward_backward(gapnet, images, ClassLogit(0))
    torch.testing.assert_close(result.input_grad, 2 * reference.input_grad)

    events.clear()
    with pytest.raises(ValueError, match="class 9 out of range"):
        forward_backward(gapnet, images, ClassLogit(9), context=Recording)
    assert events == [("enter", gapnet), ("exit", ValueError)]
    assert all(not m._forward_hooks for m in gapnet.modules())
