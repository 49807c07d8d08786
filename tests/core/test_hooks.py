import pytest
import torch
from torch import nn

from genxai.core.hooks import Trace, TraceDict, get_module, replace_module, run_until


def test_get_module_resolves_dotted_names(gapnet):
    assert get_module(gapnet, "features.2") is gapnet.features[2]


def test_unknown_layer_lists_closest_names(gapnet):
    with pytest.raises(ValueError, match=r"layer: no module named 'feature\.2'.*features\.2"):
        get_module(gapnet, "feature.2")


def test_trace_retains_output_and_removes_hook(gapnet, images):
    with Trace(gapnet, "features.2") as trace:
        gapnet(images)
    assert trace.output.shape == (4, 16, 16, 16)
    assert not gapnet.features[2]._forward_hooks


def test_hooks_removed_after_exception(gapnet, images):
    with pytest.raises(RuntimeError), TraceDict(gapnet, ["features.0", "fc"]):
        gapnet(images[:, :2])  # wrong channel count fails inside the forward
    assert all(not m._forward_hooks for m in gapnet.modules())


def test_retain_grad_survives_inplace_activation(gapnet, images):
    # features.0 is followed by an in-place ReLU: the retained tensor must keep its negative values.
    with Trace(gapnet, "features.0", retain_grad=True) as trace:
        out = gapnet(images)
    assert (trace.output < 0).any()
    (grad,) = torch.autograd.grad(out[:, 0].sum(), trace.output)
    assert grad.shape == trace.output.shape


def test_retain_grad_under_no_grad_and_frozen_model(gapnet, images):
    for p in gapnet.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), torch.enable_grad(), Trace(gapnet, "features.2", retain_grad=True) as trace:
        out = gapnet(images)
        assert out.requires_grad
    assert trace.output.requires_grad


def test_edit_output_and_stop(gapnet, images):
    def zero_unit(output, name):
        output = output.clone()
        output[:, 3] = 0
        return output

    with Trace(gapnet, "features.2", edit_output=zero_unit) as trace:
        gapnet(images)
    assert torch.all(trace.output[:, 3] == 0)
    half = run_until(gapnet, "features.1", images)
    assert half.shape == (4, 8, 16, 16)


def test_replace_module(gapnet):
    old = replace_module(gapnet, "features.1", nn.Identity())
    assert isinstance(old, nn.ReLU)
    assert isinstance(gapnet.features[1], nn.Identity)


def test_default_layer_is_the_models_own_or_the_block_of_the_last_conv(gapnet, discriminator):
    from genxai.core.hooks import default_layer

    assert default_layer(gapnet) == "features" and default_layer(discriminator) == "main"
    gapnet.default_layer = "features.2"
    assert default_layer(gapnet) == "features.2"
    with pytest.raises(ValueError, match="layer: Sequential has no Conv2d"):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)))


def test_registry_canonical_names():
    from genxai.core.registry import Registry

    registry = Registry("thing")
    registry.register("grad-cam", "gc")(object)
    assert registry.canonical("GradCam") == "grad-cam" and registry.canonical("GC") == "grad-cam"
    with pytest.raises(ValueError, match=r"thing: unknown name 'gradcma'.*grad-cam"):
        registry.canonical("gradcma")
