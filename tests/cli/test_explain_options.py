"""Method options of the explain job are strict: a misspelt one is a clear error in the API and in
``genxai explain`` (one ``error:`` line, exit code 2, no traceback), never silently ignored."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from genxai.cli import app
from genxai.data.shapes import generate_shapes
from genxai.jobs.demo import DEMO_OPTIONS
from genxai.jobs.explain import ExplainConfig, build_methods, method_options, run_explain
from genxai.models import SmallResNet, save_classifier
from genxai.report.figures import save_png

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    images, _, _ = generate_shapes(2, 16, seed=1)
    for i, image in enumerate(images):
        save_png(image, root / "images" / f"shape{i}.png")
    torch.manual_seed(0)
    save_classifier(SmallResNet(classes=6, width=4).eval(), root / "ckpt")
    return root


def test_misspelt_option_is_one_error_line_in_genxai_explain(workspace, tmp_path):
    args = ["explain", "--model", str(workspace / "ckpt"), "--images", str(workspace / "images")]
    args += ["--out", str(tmp_path / "run"), "--size", "16", "--device", "cpu", "--method", "rise"]
    result = runner.invoke(app, [*args, "options.rise.maskss=1000"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: options: method 'rise' (RISE)"), result.output
    assert "'maskss'" in lines[0] and "Did you mean 'masks'?" in lines[0]
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
    result = runner.invoke(app, [*args, "options.rsie.masks=10"])  # an unknown method in options
    assert (
        result.exit_code == 2 and "error: options: attribution method: unknown name 'rsie'" in result.output
    )


def test_misspelt_option_is_a_value_error_in_the_api(workspace, tmp_path):
    cfg = ExplainConfig(
        model=str(workspace / "ckpt"),
        images=str(workspace / "images"),
        out=str(tmp_path / "run"),
        methods=["gradcam"],
        size=16,
        device="cpu",
        options={"rise": {"maskss": 1000}},  # also for a method the run does not use
    )
    with pytest.raises(ValueError, match=r"method 'rise' \(RISE\) has no option 'maskss'"):
        run_explain(cfg, progress=False)
    model = SmallResNet(classes=6, width=4).eval()
    for strict in (True, False):  # "all" runs skip methods that cannot run, never misspelt options
        with pytest.raises(ValueError, match="'maskss'"):
            build_methods(model, ["rise"], options={"rise": {"maskss": 1}}, strict=strict)


def test_options_by_alias_and_per_method_layer():
    model = SmallResNet(classes=6, width=4).eval()
    methods, _ = build_methods(
        model,
        ["gradcam", "rise"],
        layer="layer2",
        options={"Grad-CAM": {"upsample": False}, "rise": {"masks": 10}},
    )
    assert methods["gradcam"].layer_name == "layer2" and not methods["gradcam"].upsample
    assert methods["rise"].masks == 10
    methods, _ = build_methods(model, ["gradcam"], options={"gradcam": {"layer": "layer1"}})
    assert methods["gradcam"].layer_name == "layer1"
    methods, _ = build_methods(model, ["gradcam"])
    assert methods["gradcam"].layer_name == model.default_layer


def test_demo_options_are_all_accepted():
    assert set(method_options(DEMO_OPTIONS)) == set(DEMO_OPTIONS)
