"""Patch: every temporary change to a module is undone exactly, on normal exit and on exceptions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genxai.core.patching import Patch


def state(model: nn.Module) -> dict:
    """What a patch may touch: instance forwards, Parameter objects and values, submodules, attributes."""
    return {
        "forward": [m.__dict__.get("forward") for m in model.modules()],
        "param_slots": [dict(m._parameters) for m in model.modules()],
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [dict(m._modules) for m in model.modules()],
        "attributes": [{k: v for k, v in vars(m).items() if not k.startswith("_")} for m in model.modules()],
    }


def assert_same(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["forward"] == before["forward"]
    assert after["modules"] == before["modules"]
    assert after["attributes"] == before["attributes"]
    for now, then in zip(after["param_slots"], before["param_slots"]):
        assert now.keys() == then.keys()
        assert all(now[k] is then[k] for k in now)
    for key, value in before["values"].items():
        assert torch.equal(after["values"][key].view(torch.int32), value.view(torch.int32)), key


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()


def test_every_change_is_undone_on_exit(model):
    x = torch.rand(2, 3, 6, 6)
    before, reference = state(model), model(x)
    weight = model[0].weight
    with Patch() as patch:
        patch.forward(model[1], lambda t: -t)
        new = patch.parameter(model[0], "weight", torch.zeros_like(weight))
        patch.parameter(model[0], "bias", torch.ones(4))  # absent (None) before
        patch.submodule(model, "extra", nn.Identity())
        patch.attribute(model[1], "inplace", True)
        assert model[0].weight is new and new.requires_grad and model[0].bias is not None
        assert "extra" in model._modules and model[1].inplace
        assert not torch.equal(model(x), reference)
    assert_same(model, before)
    assert model[0].weight is weight and model[0].bias is None
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)


def test_changes_are_undone_on_exceptions_and_nest(model):
    before = state(model)
    first, second = (lambda t: t + 1), (lambda t: t + 2)
    with pytest.raises(RuntimeError, match="boom"), Patch() as outer:
        outer.forward(model[1], first)
        with Patch() as inner:
            inner.forward(model[1], second)
            inner.parameter(model[0], "weight", torch.zeros_like(model[0].weight), requires_grad=False)
            assert model[1].forward is second and not model[0].weight.requires_grad
        assert model[1].forward is first  # the inner patch put back what it found
        raise RuntimeError("boom")
    assert_same(model, before)


def test_a_failing_undo_does_not_stop_the_rest(model):
    before = state(model)
    patch = Patch()
    patch.forward(model[1], lambda t: t)

    def failing_undo() -> None:
        raise KeyError("cannot undo")

    patch._undo.append(failing_undo)  # a change whose undo fails, between two ordinary ones
    patch.parameter(model[0], "weight", torch.zeros_like(model[0].weight))
    with pytest.raises(KeyError, match="cannot undo"):
        patch.restore()
    assert_same(model, before)  # both other changes were still undone


def test_bad_input_names_the_argument(model):
    with Patch() as patch:
        with pytest.raises(TypeError, match="module:"):
            patch.forward("conv", lambda t: t)
        with pytest.raises(TypeError, match="forward:"):
            patch.forward(model[0], 3)
        with pytest.raises(ValueError, match="name:"):
            patch.parameter(model, "0.weight", torch.zeros(1))
        with pytest.raises(TypeError, match="value:"):
            patch.parameter(model[0], "weight", [1.0])
        with pytest.raises(ValueError, match="name:"):
            patch.submodule(model, "", nn.Identity())
        with pytest.raises(TypeError, match="child:"):
            patch.submodule(model, "extra", "identity")
        with pytest.raises(ValueError, match=r"Patch\.parameter"):
            patch.attribute(model[0], "weight", torch.zeros(1))
