"""Data sets: the procedural shapes (determinism, masks, classes, any size), digits, and the loaders
of users' files on folders, CIFAR pickles and CelebA-HQ written by the tests themselves."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from genxai.data import (
    CIFAR,
    SHAPES,
    CelebAHQ,
    DigitsDataset,
    ImageFolderDataset,
    ShapesDataset,
    generate_shapes,
    get_dataset,
    names,
)

# --- shapes -------------------------------------------------------------------------------------


def test_shapes_are_deterministic_and_independent_of_batching():
    images, labels, masks = generate_shapes(20, 16, seed=3)
    again = generate_shapes(20, 16, seed=3, chunk=7)
    assert all(torch.equal(a, b) for a, b in zip((images, labels, masks), again))
    middle = generate_shapes(5, 16, seed=3, start=10)
    assert torch.equal(middle[0], images[10:15]) and torch.equal(middle[2], masks[10:15])
    other = generate_shapes(20, 16, seed=4)
    assert not torch.equal(other[0], images)


def test_shapes_dataset_items_cached_or_not_and_train_test_differ():
    cached = ShapesDataset(12, 16, seed=1)
    lazy = ShapesDataset(12, 16, seed=1, cache=False)
    test = ShapesDataset(12, 16, seed=1, train=False)
    for i in (0, 5, 11, -1):
        image, label, mask = cached[i]
        lazy_image, lazy_label, lazy_mask = lazy[i]
        assert torch.equal(image, lazy_image) and label == lazy_label and torch.equal(mask, lazy_mask)
    image, label, mask = cached[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int) and mask.shape == (1, 16, 16) and mask.dtype == torch.bool
    assert not any(torch.equal(cached[i][0], test[i][0]) for i in range(12))
    assert len(cached) == 12 and cached.classes == list(SHAPES)
    with pytest.raises(IndexError):
        cached[12]


def test_all_classes_appear_balanced():
    _, labels, _ = generate_shapes(60, 16, seed=0)
    assert labels.bincount(minlength=len(SHAPES)).tolist() == [10] * len(SHAPES)
    _, labels, _ = generate_shapes(9, 16, seed=0, shapes=("ring", "cross", "circle"))
    assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_masks_cover_exactly_the_drawn_shape():
    images, _, masks = generate_shapes(48, 32, seed=5)
    for image, mask in zip(images, masks[:, 0]):
        outside = image[:, ~mask]
        background = outside.median(dim=1).values[:, None]
        # the background stays within +-0.1 of its base colour and the shape >= 0.35 away from it in
        # every channel, so against any background value (here the median) the shape is >= 0.25 away
        assert float((outside - background).abs().max()) <= 0.2 + 1e-6
        assert float((image[:, mask] - background).abs().min()) >= 0.25 - 1e-6


@pytest.mark.parametrize("size", [8, 16, 33, 64])
def test_any_resolution_draws_the_same_scene(size):
    images, labels, masks = generate_shapes(12, size, seed=2)
    assert images.shape == (12, 3, size, size) and masks.shape == (12, 1, size, size)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert bool(masks.flatten(1).any(dim=1).all())
    reference = generate_shapes(12, 64, seed=2)
    assert torch.equal(labels, reference[1])
    # the object covers the same share of the image at every resolution
    share = masks.float().mean(dim=(1, 2, 3))
    assert torch.allclose(share, reference[2].float().mean(dim=(1, 2, 3)), atol=0.3 if size == 8 else 0.06)


def test_shapes_errors():
    with pytest.raises(ValueError, match="shapes: expected names"):
        generate_shapes(2, 16, shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="size: expected an integer >= 8"):
        generate_shapes(2, 4)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(2, 16, seed=-1)


# --- digits -------------------------------------------------------------------------------------


def test_digits_split_is_deterministic_disjoint_and_stratified():
    train, test = DigitsDataset(train=True, size=16), DigitsDataset(train=False, size=16)
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) < 2
    assert torch.equal(DigitsDataset(train=False, size=16).images, test.images)
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    image, label = train[0]
    assert image.shape == (1, 16, 16) and 0 <= label < 10
    assert float(train.images.min()) >= 0 and float(train.images.max()) <= 1
    assert float(torch.cdist(test.images.flatten(1), train.images.flatten(1)).min()) > 0  # no shared image


def test_digits_sizes_and_channels():
    grey = DigitsDataset(size=8)
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    assert any(torch.equal(grey[0][0][0], raw[i]) for i in range(len(raw)))
    rgb = DigitsDataset(size=32, channels=3)
    image, _ = rgb[0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])
    with pytest.raises(ValueError, match="channels"):
        DigitsDataset(channels=2)


# --- image folders, CIFAR, CelebA-HQ ------------------------------------------------------------


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    for k, name in enumerate(["cat", "dog"]):
        for i in range(2):
            _write_png(tmp_path / name / f"{i}.png", np.full((20, 30, 3), 100 * k + 10 * i))
    (tmp_path / "notes.txt").write_text("not an image")
    data = ImageFolderDataset(tmp_path, size=8)
    assert data.classes == ["cat", "dog"] and len(data) == 4
    image, label = data[3]
    assert image.shape == (3, 8, 8) and label == 1
    assert torch.allclose(image, torch.full((3, 8, 8), 110 / 255), atol=1e-6)
    grey = ImageFolderDataset(tmp_path, size=8, channels=1)
    assert grey[0][0].shape == (1, 8, 8)


def test_image_folder_flat_and_center_crop(tmp_path):
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, 5:15] = 255  # the centre square is white, the sides black
    _write_png(tmp_path / "a.png", array)
    image, label = ImageFolderDataset(tmp_path, size=10)[0]
    assert label == 0 and torch.equal(image, torch.ones(3, 10, 10))


def test_cifar10_and_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batches[name] = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    names10 = [f"class{k}".encode() for k in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names10}))
    train = CIFAR(tmp_path)  # the folder above the pickles works too
    test = CIFAR(folder, train=False)
    assert len(train) == 10 and len(test) == 2 and train.classes[7] == "class7"
    image, label = train[2]  # first image of data_batch_2
    expected = torch.as_tensor(batches["data_batch_2"][b"data"][0]).view(3, 32, 32).float() / 255
    assert label == 1 and torch.equal(image, expected)
    assert CIFAR(folder, size=16)[0][0].shape == (3, 16, 16)

    folder100 = tmp_path / "cifar-100-python"
    folder100.mkdir()
    for name, n in (("train", 3), ("test", 1)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [42] * n}
        batch[b"coarse_labels"] = [3] * n
        (folder100 / name).write_bytes(pickle.dumps(batch))
    (folder100 / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"x"] * 100}))
    cifar100 = CIFAR(tmp_path, cifar100=True)
    assert len(cifar100) == 3 and cifar100[0][1] == 42 and len(cifar100.classes) == 100


def test_celebahq_folder(tmp_path):
    _write_png(tmp_path / "celeba_hq_256" / "00001.png", np.full((12, 12, 3), 30))
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(tmp_path / "celeba_hq_256" / "00002.jpg")
    data = CelebAHQ(tmp_path, size=8)
    assert len(data) == 2 and {data[i][1] for i in range(2)} == {0} and data.classes == ["face"]
    assert data[1][0].shape == (3, 8, 8)
    assert torch.allclose(data[0][0], torch.full((3, 8, 8), 30 / 255), atol=1e-6)  # 00001.png, sorted first
    assert torch.allclose(data[1][0], torch.full((3, 8, 8), 200 / 255), atol=3 / 255)  # the JPEG, lossy


def test_missing_paths_and_files_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR pickles"):
        CIFAR(missing)
    (tmp_path / "data_batch_1").write_bytes(
        pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    )
    with pytest.raises(FileNotFoundError, match="data_batch_2"):
        CIFAR(tmp_path)
    with pytest.raises(FileNotFoundError, match="no images"):
        CelebAHQ(tmp_path)


# --- factory ------------------------------------------------------------------------------------


def test_get_dataset(tmp_path):
    assert set(names()) == {"shapes", "digits", "folder", "cifar10", "cifar100", "celebahq"}
    shapes = get_dataset("shapes", size=16, n=6, seed=2)
    assert isinstance(shapes, ShapesDataset) and shapes[0][0].shape == (3, 16, 16)
    test = get_dataset("shapes", size=16, n=6, seed=2, train=False)
    assert not torch.equal(shapes[0][0], test[0][0])
    assert get_dataset("digits", train=False)[0][0].shape == (1, 16, 16)
    _write_png(tmp_path / "img.png", np.zeros((9, 9, 3)))
    assert get_dataset("folder", root=tmp_path, size=4)[0][0].shape == (3, 4, 4)
    assert get_dataset("CelebA-HQ", root=tmp_path, size=4)[0][0].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="root: the 'cifar10' data set is read from local files"):
        get_dataset("cifar10")
    with pytest.raises(ValueError, match=r"unknown name 'shape'\. Did you mean shapes\?"):
        get_dataset("shape")
