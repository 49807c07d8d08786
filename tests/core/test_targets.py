import pytest
import torch

from genxai.core.engine import forward_backward
from genxai.core.targets import (
    ClassLogit,
    DiscriminatorScore,
    Fake,
    Predicted,
    Select,
    UnitActivation,
    as_target,
    evaluate,
)
from tests.conftest import TupleNet


def test_class_logit_int_and_tensor():
    out = torch.arange(12.0).view(3, 4)
    assert torch.equal(ClassLogit(2)(out), out[:, 2])
    assert torch.equal(ClassLogit(torch.tensor([0, 1, 3]))(out), torch.tensor([0.0, 5.0, 11.0]))


def test_class_out_of_range_names_target():
    with pytest.raises(ValueError, match="target: class 7 out of range"):
        ClassLogit(7)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="target: expected 2 class indices"):
        ClassLogit(torch.tensor([1, 2, 3]))(torch.zeros(2, 5))


def test_discriminator_score_and_fake():
    logits = torch.tensor([[1.5], [-2.0]])
    assert torch.equal(DiscriminatorScore()(logits), torch.tensor([1.5, -2.0]))
    assert torch.equal(Fake()(logits), torch.tensor([-1.5, 2.0]))
    with pytest.raises(ValueError, match="single logit"):
        Fake()(torch.zeros(2, 3))


def test_predicted_binds_argmax():
    out = torch.tensor([[0.1, 2.0], [3.0, 0.0]])
    bound = Predicted().bind(out)
    assert torch.equal(bound.index, torch.tensor([1, 0]))
    assert torch.equal(bound.take(torch.tensor([1, 1, 0])).index, torch.tensor([0, 0, 1]))


def test_as_target_rejects_bad_types():
    with pytest.raises(TypeError, match="target"):
        as_target(1.5)
    with pytest.raises(TypeError, match="target"):
        as_target(torch.tensor([0.5]))


def test_tuple_output_needs_select(images):
    model = TupleNet().eval()
    with pytest.raises(TypeError, match="Select"):
        forward_backward(model, images, as_target(1))
    result = forward_backward(model, images, Select(0, 1))
    assert result.input_grad.shape == images.shape
    dict_model = TupleNet(as_dict=True).eval()
    assert forward_backward(dict_model, images, Select("logits", 1)).scores.shape == (4,)
    with pytest.raises(ValueError, match="Select key 'nope'"):
        forward_backward(dict_model, images, Select("nope", 1))


def test_unit_activation_with_mask(gapnet, images):
    mask = torch.zeros(16, 16)
    mask[:8] = 1
    target = UnitActivation("features.2", 3, mask=mask)
    result = forward_backward(gapnet, images, target)
    with torch.no_grad():
        act = gapnet.features[:3](images)[:, 3]
    assert torch.allclose(result.scores, act[:, :8].mean(dim=(1, 2)), atol=1e-6)


def test_evaluate_checks_shape():
    with pytest.raises(ValueError, match="one score per image"):
        evaluate(as_target(lambda o: o), torch.zeros(3, 4), 3)


def test_bind_target_fixes_the_clean_prediction(gapnet, images):
    from genxai.core.targets import bind_target

    bound, clean = bind_target(gapnet, images, Predicted())
    logits = gapnet(images)
    assert isinstance(bound, ClassLogit) and torch.equal(bound.index, logits.argmax(1))
    torch.testing.assert_close(clean, logits.max(1).values)
    assert clean.dtype == torch.float32 and not clean.requires_grad
    # the bound class stays fixed on other inputs, whatever they predict
    torch.testing.assert_close(
        bound(gapnet(images.flip(0))), gapnet(images.flip(0)).gather(1, bound.index[:, None])[:, 0]
    )
    with pytest.raises(ValueError, match=r"target:.*scores a layer"):
        bind_target(gapnet, images, UnitActivation("features.0", 0))
