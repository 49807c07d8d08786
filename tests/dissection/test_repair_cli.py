"""genxai intervene and genxai repair end to end: on a GAN run folder saved as train-gan saves it,
and on the planted artifact generator of test_artifacts (patched loaders), with their one-line
user errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from genxai.cli import app
from genxai.dissection.interventions import ablate, average_causal_effect, unit_means
from genxai.evaluation.fid import FID
from genxai.jobs import dissection as job
from genxai.jobs import interventions as fix_job
from tests.dissection.test_artifacts import (
    COARSE,
    COARSE_PLANTED,
    FINE_PLANTED,
    Detector,
    Planted,
    Whiteness,
    images_of,
    white,
)
from tests.dissection.test_dissection_cli import _errors, _gan_run

runner = CliRunner()


class WhiteSegmenter:
    concepts = ("other", "white")

    def concept_masks(self, images):
        w = white(images)
        return torch.stack([~w, w], 1)


@pytest.fixture
def planted(monkeypatch):
    gen = Planted().eval()
    monkeypatch.setattr(job, "load_gan", lambda run, device: gen)
    monkeypatch.setattr(job, "load_segmenter", lambda path, device: WhiteSegmenter())
    monkeypatch.setattr(fix_job, "load_artifact_classifier", lambda path, device: Detector())
    return gen


def no_hooks(model):
    return all(not m._forward_hooks for m in model.modules())


def test_intervene_on_a_gan_run(tmp_path):
    run = _gan_run(tmp_path / "gan")
    args = ["intervene", "-g", str(run), "-l", "blocks.1", "-u", "0,2-3", "--n", "6", "--show", "4"]
    out = runner.invoke(app, [*args, "--out", str(tmp_path / "i"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "i" / "intervention.json").read_text())
    assert results["units"] == [0, 2, 3] and results["value"] == 0.0 and results["pixel_change"] > 0
    assert results["ace"] == {} and results["meta"]["generator"] == str(run)
    for name in ("before_after.png", "report.html"):
        assert (tmp_path / "i" / name).is_file(), name


def test_ablating_the_patch_unit_removes_white_and_agrees_with_ace(tmp_path, planted):
    base = ["intervene", "-g", "g", "-l", "coarse", "-s", "s", "--n", "64", "--batch-size", "16"]
    out = runner.invoke(app, [*base, "-u", str(COARSE_PLANTED), "--out", str(tmp_path / "a")])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "a" / "intervention.json").read_text())
    z = planted.latents(256, generator=torch.Generator().manual_seed(0))[:64]  # SeededLatents, seed 0

    def white_fraction(x):  # the generator's [-1, 1] output, as the segmenter sees it
        return white((x + 1) / 2).flatten(1).float().mean(1)

    expected = average_causal_effect(planted, "coarse", [COARSE_PLANTED], white_fraction, z)
    assert results["ace"]["white"] == pytest.approx(expected, abs=1e-6) and expected < -0.01
    assert results["ace"]["other"] == pytest.approx(-expected, abs=1e-6)
    assert set(results["figures"]) == {"before_after", "ace"}
    assert "Average causal effect per concept" in (tmp_path / "a" / "report.html").read_text()
    # another unit barely moves white; inserting k into the patch unit paints white everywhere
    out = runner.invoke(app, [*base, "-u", "0", "--out", str(tmp_path / "b")])
    other = json.loads((tmp_path / "b" / "intervention.json").read_text())["ace"]["white"]
    assert abs(other) < abs(expected) / 4
    out = runner.invoke(
        app, [*base, "-u", "2", "--mode", "insert", "--value", "3", "--out", str(tmp_path / "c")]
    )
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "c" / "intervention.json").read_text())["ace"]["white"] > 0.5
    out = runner.invoke(
        app, [*base, "-u", "2", "--mode", "insert", "--value-concept", "white", "--out", str(tmp_path / "d")]
    )
    assert out.exit_code == 0, out.output
    inserted = json.loads((tmp_path / "d" / "intervention.json").read_text())
    k = unit_means(planted, "coarse", z, lambda x: white((x + 1) / 2))[COARSE_PLANTED]  # images in [0, 1]
    assert inserted["value"] == pytest.approx([float(k)]) and inserted["ace"]["white"] > 0
    assert no_hooks(planted)


def test_intervene_user_errors_are_one_line(tmp_path, planted):
    base = ["intervene", "-g", "g", "--out", str(tmp_path / "x"), "--n", "4"]
    cases = [
        (["-l", "corse", "-u", "1"], "Closest names: coarse"),
        (["-l", "coarse", "-u", "6"], f"valid: 0..{COARSE - 1}"),
        (["-l", "coarse", "-u", "1,x"], "--units: expected integers"),
        (["-l", "coarse", "-u", "1", "--mode", "insert"], "exactly one of --value"),
        (["-l", "coarse", "-u", "1", "--mode", "erase"], "mode"),
        (["-l", "coarse", "-u", "1", "--value", "2"], "--value and --value-concept are for insert"),
        (["-l", "coarse", "-u", "1", "--mode", "insert", "--value-concept", "white"], "needs a segmenter"),
        (["-l", "coarse", "-u", "1", "--box", "0,0,2"], "--box: expected top,left,bottom,right"),
        (["-l", "coarse", "-u", "1", "--box", "0,0,9,2"], "location: box"),
        (["-l", "coarse", "-u", "1", "--n", "0"], "n"),
        (
            ["-l", "coarse", "-u", "1", "-s", "s", "--mode", "insert", "--value-concept", "whte"],
            "Closest: white",
        ),
    ]
    for extra, message in cases:
        out = runner.invoke(app, [*base, *extra])
        assert out.exit_code == 2, (extra, out.output)
        assert message in out.output and "Traceback" not in out.output, (extra, out.output)
        assert len(_errors(out.output)) == 1, out.output
    assert no_hooks(planted) and not (tmp_path / "x" / "intervention.json").exists()


def test_repair_ablates_the_patch_units_and_lowers_fid(tmp_path, planted, monkeypatch):
    real = images_of(planted, 7, 512, clean=True)
    monkeypatch.setattr(fix_job, "load_gan_config", lambda run: object())
    monkeypatch.setattr(fix_job, "real_images", lambda cfg: real)

    def reference(cfg, dataset, device, cache_dir, **options):
        fid = FID(Whiteness())
        for batch in dataset.split(128):
            fid.update(batch, real=True)
        return fid

    monkeypatch.setattr(fix_job, "fid_reference", reference)
    args = ["repair", "-g", "g", "-l", "coarse,fine", "-k", "1", "--classifier", "c", "--n", "256"]
    out = runner.invoke(app, [*args, "--fid-samples", "256", "--out", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "repair.json").read_text())
    assert results["units"] == {"coarse": [COARSE_PLANTED], "fine": [FINE_PLANTED]}
    before, after = results["table"]
    assert before["phase"] == "before" and after["artifact score"] < 0.05 < before["artifact score"]
    name = Whiteness.fid_name
    assert after[name] < 0.2 * before[name]
    html = (tmp_path / "report.html").read_text()
    assert "Artifact correction" in html and "Units ablated per layer" in html
    assert (tmp_path / "before_after.png").is_file() and no_hooks(planted)


def test_repair_by_dissection_ablates_the_units_with_the_worst_top_sample_fid(tmp_path, monkeypatch):
    """GAN Dissection's variant on the independent-units generator of test_artifact_units."""
    from genxai.evaluation.fid import reference_statistics
    from tests.dissection.test_artifact_units import PLANTED, Independent, WhiteFraction

    gen = Independent().eval()
    z = gen.latents(512, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), ablate(gen, "units", [PLANTED]):
        real = torch.utils.data.TensorDataset((gen(z) + 1) / 2)
    monkeypatch.setattr(job, "load_gan", lambda run, device: gen)
    monkeypatch.setattr(fix_job, "load_gan_config", lambda run: object())
    monkeypatch.setattr(fix_job, "real_images", lambda cfg: real)
    monkeypatch.setattr(
        fix_job, "fid_reference", lambda cfg, dataset, *a, **k: reference_statistics(WhiteFraction(), dataset)
    )
    args = ["repair", "-g", "g", "-l", "units", "-k", "1", "--method", "dissection", "--top", "16"]
    out = runner.invoke(
        app, [*args, "--n", "256", "--fid-samples", "256", "--out", str(tmp_path), "--no-progress"]
    )
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "repair.json").read_text())
    assert results["method"] == "dissection" and results["units"] == {"units": [PLANTED]}
    before, after = results["table"]
    assert (
        "artifact score" not in before
        and after[WhiteFraction.fid_name] < 0.2 * before[WhiteFraction.fid_name]
    )
    assert "artifact units (Bau et al., 2019)" in (tmp_path / "report.html").read_text()
    bad = runner.invoke(app, [*args[:-1], "64", "--n", "32", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--n >= 64" in bad.output and no_hooks(gen)


def test_repair_user_errors_are_one_line(tmp_path, planted):
    base = ["repair", "-g", "g", "--classifier", "c", "--out", str(tmp_path / "x"), "--n", "8"]
    cases = [
        (["-l", "corse"], "Closest names: coarse"),
        (["-l", "coarse", "-k", "7"], f"more than the {COARSE} units"),
        (["-l", "coarse,fine", "-k", "1,2,3"], "one per layer"),
        (["-l", "coarse,coarse"], "distinct"),
        (["-l", "coarse", "--features", "clip"], "features"),
        (["-l", "coarse", "--method", "gandissect"], "method"),
        (["-l", "coarse", "--fid-samples", "10"], "no config.yaml"),
    ]
    for extra, message in cases:
        out = runner.invoke(app, [*base, *extra])
        assert out.exit_code == 2, (extra, out.output)
        assert message in out.output and "Traceback" not in out.output, (extra, out.output)
        assert len(_errors(out.output)) == 1, out.output


def test_repair_without_data_asks_for_a_classifier(tmp_path):
    run = _gan_run(tmp_path / "gan")  # a run folder without config.yaml: no real images to train on
    out = runner.invoke(app, ["repair", "-g", str(run), "-l", "blocks.1", "--out", str(tmp_path / "y")])
    assert out.exit_code == 2 and "pass --classifier" in out.output and len(_errors(out.output)) == 1


def test_repair_trains_its_classifier_on_the_runs_real_images(tmp_path, planted, monkeypatch):
    from torch.utils.data import TensorDataset

    monkeypatch.setattr(fix_job, "load_gan_config", lambda run: object())
    monkeypatch.setattr(
        fix_job, "real_images", lambda cfg: TensorDataset(images_of(planted, 11, 256, clean=True))
    )
    args = ["repair", "-g", "g", "-l", "coarse", "-k", "1", "--classifier-iterations", "150", "--n", "256"]
    args += ["--classifier-width", "8"]
    out = runner.invoke(app, [*args, "--batch-size", "32", "--out", str(tmp_path), "--no-progress"])
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "repair.json").read_text())
    assert results["units"] == {"coarse": [COARSE_PLANTED]}
    assert results["artifact_after"] < results["artifact_before"] - 0.15
    assert (tmp_path / "classifier" / "artifact_classifier.safetensors").is_file()
    assert results["meta"]["classifier"] == str(tmp_path / "classifier")
