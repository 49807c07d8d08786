"""SmallResNet, its training loop, checkpoints, and torchvision models by name."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from genxai.core.hooks import get_module
from genxai.models import (
    ClassifierConfig,
    SmallResNet,
    default_layer,
    load_classifier,
    load_model,
    load_torchvision,
    save_classifier,
    train_classifier,
)
from genxai.models.classifier import IMAGENET_MEAN, IMAGENET_STD, input_size, random_weights_note


def quadrant_data(n: int = 96, size: int = 16, seed: int = 0) -> TensorDataset:
    """A bright square in one of four quadrants; the label is the quadrant."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    x = 0.2 * torch.rand(n, 3, size, size, generator=g)
    half = size // 2
    rows, cols = (labels // 2) * half, (labels % 2) * half
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = (yy >= rows[:, None, None] + 1) & (yy < rows[:, None, None] + half - 1)
    inside &= (xx >= cols[:, None, None] + 1) & (xx < cols[:, None, None] + half - 1)
    x = x + 0.7 * inside[:, None].float()
    return TensorDataset(x, labels)


def test_small_resnet_shapes_and_named_layers():
    model = SmallResNet(classes=5, channels=1, width=4).eval()
    out = model(torch.rand(2, 1, 20, 20))
    assert out.shape == (2, 5)
    for name in ("stem", "layer1", "layer2", "layer3", "pool", "fc", "layer3.conv2"):
        get_module(model, name)
    assert default_layer(model) == "layer3"
    with pytest.raises(ValueError, match="classes"):
        SmallResNet(classes=0)


def test_train_classifier_learns_and_is_seeded():
    data = quadrant_data()
    first = train_classifier(data, epochs=4, batch_size=16, width=4, lr=1e-2, seed=3)
    second = train_classifier(data, epochs=4, batch_size=16, width=4, lr=1e-2, seed=3)
    assert first.accuracy >= 0.9
    assert first.losses[-1] < first.losses[0]
    assert first.losses == second.losses
    assert first.model.config.classes == 4 and first.model.config.image_size == 16
    assert not first.model.training


def test_train_classifier_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(quadrant_data(8), epochs=0)
    with pytest.raises(ValueError, match="dataset"):
        train_classifier(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0)), epochs=1)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SmallResNet(ClassifierConfig(classes=3, width=4, class_names=["a", "b", "c"])).eval()
    save_classifier(model, tmp_path / "ckpt", accuracy=0.5)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["arch"] == "SmallResNet" and config["classes"] == 3 and config["accuracy"] == 0.5
    x = torch.rand(2, 3, 16, 16)
    for path in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors"):
        loaded = load_classifier(path)
        assert loaded.config.class_names == ["a", "b", "c"]
        torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(load_model(str(tmp_path / "ckpt"))(x), model(x))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_classifier(tmp_path)


def test_torchvision_by_name_normalizes_inside_and_keeps_layer_names():
    torch.manual_seed(0)
    model = load_torchvision("resnet18", classes=7)
    assert default_layer(model) == "layer4"
    get_module(model, "layer4.1.conv2")
    x = torch.rand(2, 3, 32, 32)
    plain = load_torchvision("resnet18", classes=7, normalize=False)
    plain.load_state_dict(model.state_dict())
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - mean) / std))
    assert default_layer(load_torchvision("vgg11", classes=2)) == "features"


def test_torchvision_weights_from_local_files(tmp_path):
    torch.manual_seed(0)
    source = load_torchvision("resnet18", classes=3, normalize=False)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    x = torch.rand(1, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = source((x - mean) / std)  # the saved network; the loaded one normalises inside
    for file in ("w.pth", "w.safetensors"):
        loaded = load_model("resnet18", tmp_path / file, classes=3)
        assert loaded.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected)
    with pytest.raises(ValueError, match="does not fit"):
        load_torchvision("resnet18", tmp_path / "w.pth", classes=10)
    with pytest.raises(FileNotFoundError, match="weights"):
        load_torchvision("resnet18", tmp_path / "missing.pth")


def test_unknown_model_names_close_matches(tmp_path):
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet81'\. Did you mean resnet18,"):
        load_model("resnet81")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(str(tmp_path / "nothing_here"))


def test_a_torchvision_model_without_weights_warns_that_they_are_random(tmp_path):
    with pytest.warns(UserWarning, match=r"model: squeezenet1_1 has random weights .* --weights PATH"):
        model = load_model("squeezenet1_1", classes=3)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model("squeezenet1_1", tmp_path / "w.pth", classes=3)
    assert random_weights_note("squeezenet1_1", None) is not None
    assert random_weights_note("squeezenet1_1", tmp_path / "w.pth") is None
    assert random_weights_note(tmp_path / "ckpt", None) is None


def test_weights_files_are_checked(tmp_path):
    torch.save({"net": object.__new__(ClassifierConfig)}, tmp_path / "pickled.pth")  # not plain tensors
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    for file, message in (
        ("pickled.pth", r"holds objects other than tensors, which torch.load\(weights_only=True\) refuses"),
        ("junk.safetensors", "is not a .safetensors file or a torch state dict"),
        ("tensor.pth", "holds a Tensor, not a state dict"),
    ):
        with pytest.raises(ValueError, match=f"weights: .*{file} {message}"):
            load_torchvision("squeezenet1_1", tmp_path / file, classes=3)
    save_classifier(SmallResNet(classes=2, width=4), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"weights: .* is a genxai checkpoint with its own weights"):
        load_model(tmp_path / "ckpt", tmp_path / "tensor.pth")


def test_input_size_of_checkpoints_and_torchvision_models(tmp_path):
    save_classifier(SmallResNet(classes=2, width=4, image_size=16), tmp_path / "ckpt")
    assert input_size(load_model(tmp_path / "ckpt")) == 16
    assert input_size(load_torchvision("squeezenet1_1", classes=3)) == 224
