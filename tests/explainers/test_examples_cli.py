"""The commands examples, tcav and influence end to end on tiny data; bad input: one error line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from genxai.cli import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from genxai.data import get_dataset
    from genxai.models.classifier import save_classifier, train_classifier

    torch.manual_seed(0)
    result = train_classifier(get_dataset("shapes", size=8, n=120, seed=0), epochs=1, width=4, batch_size=32)
    return save_classifier(result.model, tmp_path_factory.mktemp("cls") / "model")


def _run(*args: str):
    return CliRunner().invoke(app, [*args, "--device", "cpu"])


def test_examples_command_writes_the_report(classifier, tmp_path):
    out = tmp_path / "ex"
    result = _run("examples", "-m", str(classifier), "-l", "layer3", "-o", str(out), "--n", "60",
                  "--queries", "2", "--k", "3", "--prototypes", "3", "--criticisms", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert len(results["prototypes"]) == 3 and len(results["queries"]) == 2
    assert all(len(q["counterfactual"]) == 3 for q in results["queries"])
    assert (out / "neighbours.png").is_file() and "Prototypes and criticisms" in (
        out / "report.html"
    ).read_text()
    bad = _run(
        "examples", "-m", str(classifier), "-l", "layer3", "-o", str(out), "--n", "60", "--target", "blob"
    )
    assert (
        bad.exit_code == 2
        and bad.output.count("error:") == 1
        and "target: unknown class 'blob'" in bad.output
    )


def test_tcav_command_and_its_errors(classifier, tmp_path):
    out = tmp_path / "tcav"
    common = ["tcav", "-m", str(classifier), "-l", "layer2", "-o", str(out), "--images", "6", "--set-size", "6",
              "--random-sets", "2", "--pool", "60"]  # fmt: skip
    result = _run(*common, "--target", "circle", "--concept", "texture:stripes")
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "results.json").read_text())["concepts"]
    assert record["concept"] == "texture:stripes" and 0 <= record["tcav"] <= 1
    bad = _run(*common, "--target", "blob", "--concept", "texture:stripes")
    assert bad.exit_code == 2 and "error: --target: unknown class 'blob'" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = _run(*common, "--target", "circle", "--concept", str(empty))
    assert (
        bad.exit_code == 2 and bad.output.count("error:") == 1 and "--concept: the concept set" in bad.output
    )
    assert "is empty" in bad.output
    bad = _run(*common, "--target", "circle", "--concept", "texture:velvet")
    assert bad.exit_code == 2 and "--concept: unknown texture 'velvet'" in bad.output


def test_influence_command_trains_explains_and_refuses_one_checkpoint(tmp_path):
    run, out = tmp_path / "run", tmp_path / "infl"
    common = ["influence", "-r", str(run), "-o", str(out), "--size", "8", "--n", "32", "--queries", "2",
              "--top", "3", "--no-progress"]  # fmt: skip
    one = _run(*common, "--train", "--iterations", "2", "--checkpoint-every", "5")
    assert one.exit_code == 2 and one.output.count("error:") == 1
    assert (
        "checkpoints: TracIn sums over the training trajectory and needs at least 2 checkpoints, got 1"
        in one.output
    )
    result = _run(*common, "--train", "--iterations", "6", "--checkpoint-every", "2")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoints"] == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000006"]
    assert len(results["queries"][0]["helped"]) == 3 and (out / "influence.png").is_file()
    assert (run / "model" / "model.safetensors").is_file()  # the final classifier, for --model
    exact = _run(*common, "--method", "exact")
    assert exact.exit_code == 0, exact.output
    missing = _run("influence", "-r", str(tmp_path / "nothing"), "-o", str(out), "--size", "8", "--n", "8")
    assert missing.exit_code == 2 and "error: run:" in missing.output
