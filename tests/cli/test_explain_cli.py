"""``genxai explain`` / ``report`` end to end on a folder of shapes PNGs and a tiny checkpoint,
bad input, and two processes under ``accelerate launch``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from genxai.attribution import Attribution, Saliency, names
from genxai.cli import app
from genxai.data.shapes import generate_shapes
from genxai.jobs.explain import Explainer, build_methods, resolve_methods
from genxai.models import SmallResNet, save_classifier
from genxai.report.figures import save_png

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """4 shapes PNGs (two in a subfolder) at 32 px and a random tiny SmallResNet checkpoint."""
    root = tmp_path_factory.mktemp("explain")
    images, _, _ = generate_shapes(4, 32, seed=5)
    for i, image in enumerate(images):
        save_png(image, root / "images" / ("sub" if i >= 2 else "") / f"shape{i}.png")
    torch.manual_seed(0)
    save_classifier(SmallResNet(classes=6, width=4).eval(), root / "ckpt")
    return root


def explain(workspace, out, *args):
    base = ["explain", "--model", str(workspace / "ckpt"), "--images", str(workspace / "images")]
    return runner.invoke(app, [*base, "--out", str(out), "--size", "32", "--device", "cpu", *args])


def test_explain_writes_overlays_maps_metrics_and_report(workspace, tmp_path):
    out = tmp_path / "run"
    result = explain(
        workspace,
        out,
        "--method",
        "gradcam",
        "--method",
        "saliency",
        "--batch-size",
        "3",
        "--curve-steps",
        "4",
    )
    assert result.exit_code == 0, result.output
    ids = ["shape0", "shape1", "sub__shape2", "sub__shape3"]
    for image_id in ids:
        assert (out / "images" / f"{image_id}.png").is_file()
        for method in ("gradcam", "saliency"):
            assert (out / "overlays" / method / f"{image_id}.png").is_file()
        maps = load_file(str(out / "maps" / f"{image_id}.safetensors"))
        assert maps["gradcam"].shape == (1, 32, 32) and maps["saliency"].shape == (3, 32, 32)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"] == ["gradcam", "saliency"]
    assert {r["image"] for r in metrics["per_image"]} == set(ids)
    for record in metrics["summary"]:
        assert record["images"] == 4
        for key in ("average_drop", "increase_in_confidence", "win_percent", "deletion_auc", "insertion_auc"):
            assert key in record
    win = {r["method"]: r["win_percent"] for r in metrics["summary"]}
    assert win["gradcam"] + win["saliency"] == pytest.approx(100.0)
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("method,images,ms_per_image,average_drop")
    config = json.loads((out / "config.json").read_text())
    assert config["layer"] == "layer3" and config["processes"] == 1
    page = (out / "report.html").read_text()
    assert 'src="overlays/gradcam/sub__shape3.png"' in page

    result = runner.invoke(app, ["report", str(out), "--embed"])
    assert result.exit_code == 0, result.output
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_explain_target_layer_and_no_metrics(workspace, tmp_path):
    out = tmp_path / "run"
    result = explain(
        workspace, out, "--method", "Grad-CAM", "--layer", "layer2", "--target", "4", "--no-metrics"
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())["per_image"]
    assert {r["target"] for r in rows} == {4} and "average_drop" not in rows[0]
    assert json.loads((out / "config.json").read_text())["layer"] == "layer2"


def test_explain_config_file_and_dotted_overrides(workspace, tmp_path):
    config = tmp_path / "explain.yaml"
    config.write_text("methods: [gradcam, rise]\nmetrics: false\noptions:\n  rise: {masks: 40}\n")
    out = tmp_path / "run"
    result = explain(workspace, out, "--config", str(config), "options.rise.masks=24", "curve_steps=8")
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["methods"] == ["gradcam", "rise"] and saved["options"] == {"rise": {"masks": 24}}
    assert saved["curve_steps"] == 8 and saved["metrics"] is False
    result = explain(workspace, tmp_path / "bad", "size=big")
    assert result.exit_code == 2 and "size" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gradcma"], "gradcam"),
        (["--method", "gradcam", "--layer", "layer9"], "layer1"),
        (["--target", "17", "--method", "saliency"], "out of range"),
    ],
)
def test_bad_input_is_a_clear_error(workspace, tmp_path, args, message):
    result = explain(workspace, tmp_path / "run", *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_bad_folders_and_models(workspace, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--images", str(tmp_path / "nope")], "no folder"),
        (["--images", str(tmp_path / "empty")], "no image files"),
        (["--model", "resnet81", "--images", str(workspace / "images")], "resnet18"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["explain", "--out", str(tmp_path / "run"), *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "metrics.json" in result.output


def test_demo_small(tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--size",
        "16",
        "--epochs",
        "1",
        "--train-images",
        "120",
        "--images",
        "3",
        "--no-diffusion",
    ]
    result = runner.invoke(app, [*args, "--method", "gradcam", "--method", "saliency"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"] == ["gradcam", "saliency"]
    for key in ("pointing_game", "localization_energy", "win_percent"):
        assert key in metrics["summary"][0]  # the shapes' masks give the localisation metrics
    assert (out / "model" / "model.safetensors").is_file() and (out / "report.html").is_file()
    assert len(list((out / "overlays" / "gradcam").glob("*.png"))) == 3
    assert "held-out accuracy" in (out / "report.html").read_text()
    result = runner.invoke(app, ["demo", "--out", str(out), "--method", "nope"])
    assert result.exit_code == 2 and "unknown name" in result.output


TINY_DIFFUSION = [
    "data.image_size=8",
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.attention_resolutions=[4]",
    "discriminator.base_channels=8",
    "cycle.phase_a=2",
    "cycle.phase_b=2",
    "cycle.cycles=1",
    "train.batch_size=4",
    "train.checkpoint_every=6",
    "train.sample_every=6",
    "train.eval_every=6",
    "eval.num_samples=8",
    "eval.real_images=32",
    "sample.num_images=4",
    "sample.steps=3",
]


def test_demo_runs_the_diffusion_job_first(tmp_path, capsys):
    """The diffusion job first, each step said as it starts; one report with colour bars on the maps
    and the real training images."""
    from genxai.jobs.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(
        out,
        size=16,
        epochs=1,
        train_images=60,
        explain_images=2,
        methods=["gradcam"],
        progress=True,
        diffusion_overrides=[*TINY_DIFFUSION, "train.progress=false"],
    )
    results = json.loads((out / "diffusion" / "results.json").read_text())
    assert set(results["runs"]) == {"baseline", "noise+hierarchical"}
    assert all(run["processes"] == 6 for run in results["runs"].values())
    html = report.read_text()
    assert html.index("XAI-guided diffusion: ablation") < html.index("held-out accuracy")
    assert "What the discriminator calls fake" in html
    assert (
        html.count('<figure class="map"') >= 3 and "grid-figure map" in html
    )  # S/w, attention, D's saliency
    assert "The classifier&#39;s training data (real images)" in html and (out / "real_images.png").is_file()
    said = capsys.readouterr().err
    steps = [
        "[1/4] XAI-guided diffusion on the bundled 8-px shapes",
        "training baseline then noise+hierarchical",
        "each run computes FID on 8 samples against 32 real images every 6 Processes",
        "baseline: 6 Processes in",
        "noise+hierarchical: 6 Processes in",
        "[2/4] training the classifier to explain",
        "held-out accuracy",
        "[3/4] explaining 2 held-out images with 1 method (gradcam)",
        f"metrics in {out / 'metrics.csv'}",
        "[4/4] writing the report",
        f"open {report}",
    ]
    positions = [said.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), said
    report.unlink()
    result = runner.invoke(app, ["report", str(out)])  # rebuilds both parts of the demo's report
    assert result.exit_code == 0, result.output
    rebuilt = report.read_text()
    for part in ("XAI-guided diffusion: ablation", "real images", "held-out accuracy", 'class="map"'):
        assert part in rebuilt, part
    assert "Processes/s *" in rebuilt and "ms_per_image *" in rebuilt  # speeds: the load note
    assert "* wall-clock time on the machine that ran it" in rebuilt


class HeadNet(torch.nn.Module):
    """Conv features and a linear classifier called ``head`` (so CAM, which wants ``fc``, cannot run)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class Broken(Attribution):
    def attribute(self, x, target):
        raise RuntimeError("this method always fails")


def test_all_methods_skip_what_cannot_run(tmp_path):
    assert resolve_methods(["ALL", "saliency"]) == names()
    assert resolve_methods(["Grad-CAM", "gradcam", "vanilla"]) == ["gradcam", "saliency"]
    model = HeadNet().eval()
    with pytest.raises(ValueError, match="fc"):
        build_methods(model, ["cam"], layer="features")
    methods, skipped = build_methods(model, ["cam", "gradcam"], layer="features", strict=False)
    assert list(methods) == ["gradcam"] and "fc" in skipped["cam"]
    explainer = Explainer(
        model, {"broken": Broken(model), "saliency": Saliency(model)}, tmp_path, strict=False, curve_steps=2
    )
    rows = explainer.run_batch(["a", "b"], torch.rand(2, 3, 8, 8))
    assert {r["method"] for r in rows} == {"saliency"} and "always fails" in explainer.skipped["broken"]
    with pytest.raises(RuntimeError, match="always fails"):
        Explainer(model, {"broken": Broken(model)}, tmp_path).run_batch(["a"], torch.rand(1, 3, 8, 8))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str, script: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``accelerate launch`` two CPU processes of the genxai CLI (or of ``script``) with ``args``.

    ``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up
    (accelerate's CPU launcher is mpirun); ``--multi_gpu`` uses torchrun, which starts the two
    processes, and ``--device cpu`` makes them talk over gloo, with or without GPUs.
    """
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *(["-m", "genxai.cli"] if script is None else [str(script)]),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


METRIC_KEYS = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc")


def _explain_args(workspace, images, out, *methods: str) -> list[str]:
    args = ["explain", "--model", str(workspace / "ckpt"), "--images", str(images), "--out", str(out)]
    args += [arg for method in methods for arg in ("--method", method)]
    return [*args, "--size", "32", "--batch-size", "1", "--curve-steps", "2", "--device", "cpu"]


def test_two_processes_under_accelerate_launch(workspace, tmp_path):
    """Two CPU processes, each explaining its share of 5 images (3 and 2: one process has a batch
    round without a batch); their metrics merge by torchmetrics' sync and equal a 1-process run's."""
    images, _, _ = generate_shapes(5, 32, seed=6)
    for i, image in enumerate(images):
        save_png(image, tmp_path / "images" / f"img{i}.png")
    out = tmp_path / "run"
    args = _explain_args(workspace, tmp_path / "images", out, "saliency", "inputxgradient")
    done = _launch(*args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (out / "parts").exists()  # no per-process files: the metrics merge in memory
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["per_image"]
    processes = {r["image"]: r["process"] for r in rows}
    assert processes == {"img0": 0, "img1": 0, "img2": 0, "img3": 1, "img4": 1}  # both did work
    assert len(rows) == 5 * 2
    assert {r["images"] for r in metrics["summary"]} == {5}
    assert len(list((out / "maps").glob("*.safetensors"))) == 5
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    assert (out / "report.html").is_file()

    single = tmp_path / "single"
    result = runner.invoke(
        app, _explain_args(workspace, tmp_path / "images", single, "saliency", "inputxgradient")
    )
    assert result.exit_code == 0, result.output
    alone = json.loads((single / "metrics.json").read_text())
    assert [(r["image"], r["method"]) for r in alone["per_image"]] == [
        (r["image"], r["method"]) for r in rows
    ]
    keys = ("target", "predicted", "probability", "win_percent", *METRIC_KEYS)
    for merged, reference in zip(rows, alone["per_image"]):
        assert {k: merged[k] for k in keys} == pytest.approx({k: reference[k] for k in keys}, abs=1e-5)
    for merged, reference in zip(metrics["summary"], alone["summary"]):
        assert {k: merged[k] for k in METRIC_KEYS} == pytest.approx(
            {k: reference[k] for k in METRIC_KEYS}, abs=1e-5
        )


FLAKY_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from genxai.attribution import Saliency
    from genxai.attribution.base import register
    from genxai.cli import app

    @register("flaky")
    class Flaky(Saliency):  # fails on the second process only, as a method can on one shard
        def attribute(self, x, target):
            if os.environ["RANK"] == "1":
                raise RuntimeError("flaky fails on this shard")
            return super().attribute(x, target)

    code, message = 0, ""
    try:
        app(sys.argv[2:], prog_name="genxai")
    except SystemExit as exit:
        code = exit.code
    except Exception as err:
        code, message = 1, f"{type(err).__name__}: {err}"
    rank = int(os.environ["RANK"])
    Path(sys.argv[1], f"exit-{rank}.txt").write_text(f"{code}\\n{message}")
    # wait for the other's exit too, so the launcher, which stops the others when one process
    # ends with an error, cannot cut a process short that would have ended by itself
    deadline = time.monotonic() + 100
    while not Path(sys.argv[1], f"exit-{1 - rank}.txt").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    sys.exit(code)
    """
)


def test_a_method_failing_on_one_process_fails_every_process(workspace, tmp_path):
    """A method that fails on process 1 only stops both processes with the same error, quickly."""
    script = tmp_path / "flaky.py"
    script.write_text(FLAKY_SCRIPT)
    started = time.monotonic()
    done = _launch(
        str(tmp_path),
        *_explain_args(workspace, workspace / "images", tmp_path / "run", "saliency", "flaky"),
        script=script,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert done.returncode != 0, done.stdout[-3000:] + done.stderr[-3000:]
    exits = [(tmp_path / f"exit-{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert exits[0] == exits[1], exits  # the same error on both processes
    code, message = exits[0]
    assert code == "1" and message == "RuntimeError: flaky fails on this shard [process 1 of 2]"
    assert elapsed < 120


class FailsOnProcessOne(Attribution):
    """|x| summed over channels, but an error on process 1 (a method failing on one shard)."""

    def attribute(self, x, target):
        if torch.distributed.get_rank() == 1:
            raise RuntimeError("fails on process 1")
        return x.abs().sum(dim=1, keepdim=True)


IDS = [f"img{i}" for i in range(5)]


def _explainer_rows(methods, shard, out, strict=True):
    """Run an Explainer of HeadNet over ``shard`` (batches of image indices); its merged rows."""
    torch.manual_seed(1)
    x = torch.rand(5, 3, 8, 8)
    batches = [([IDS[i] for i in batch], x[batch], None) for batch in shard]
    explainer = Explainer(
        methods["model"], methods["methods"], out, strict=strict, curve_steps=2, image_ids=IDS
    )
    rows = explainer.run(batches, total=sum(map(len, shard)), device=torch.device("cpu"), progress=False)
    return rows, explainer.skipped


def _headnet_methods(*names):
    torch.manual_seed(0)
    model = HeadNet().eval()
    every = {"saliency": Saliency(model), "flaky": FailsOnProcessOne(model)}
    return {"model": model, "methods": {name: every[name] for name in names}}


def _agreeing_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        shard = [[0], [1], [2]] if rank == 0 else [[3, 4]]  # process 1 runs out of batches first
        results = {}
        for strict in (False, True):
            try:
                rows, skipped = _explainer_rows(
                    _headnet_methods("saliency", "flaky"), shard, Path(out) / f"run{rank}", strict
                )
                results[str(strict)] = {"rows": rows, "skipped": skipped}
            except Exception as err:
                results[str(strict)] = {"error": f"{type(err).__name__}: {err}"}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(240)
def test_explainer_processes_agree_on_a_method_failing_on_one_of_them(tmp_path):
    """Not strict: the method is dropped on both processes, whose merged rows equal one process's
    without it. Strict: both processes raise the same error."""
    import torch.multiprocessing as mp

    mp.spawn(_agreeing_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    alone, _ = _explainer_rows(_headnet_methods("saliency"), [[0], [1], [2], [3, 4]], tmp_path / "alone")
    for result in results:
        assert result["True"] == {"error": "RuntimeError: fails on process 1 [process 1 of 2]"}
        lenient = result["False"]
        assert lenient["skipped"] == {"flaky": "RuntimeError: fails on process 1"}
        assert [r["process"] for r in lenient["rows"]] == [0, 0, 0, 1, 1]
        assert [(r["image"], r["method"]) for r in lenient["rows"]] == [
            (r["image"], r["method"]) for r in alone
        ]
        keys = ("target", "predicted", "probability", *METRIC_KEYS)
        for merged, reference in zip(lenient["rows"], alone):
            assert {k: merged[k] for k in keys} == pytest.approx({k: reference[k] for k in keys}, abs=1e-6)


def test_size_defaults_to_the_checkpoints_own_input_size(workspace, tmp_path):
    torch.manual_seed(0)
    save_classifier(SmallResNet(classes=6, width=4, image_size=16).eval(), tmp_path / "ckpt16")
    out = tmp_path / "run"
    args = ["explain", "--model", str(tmp_path / "ckpt16"), "--images", str(workspace / "images")]
    result = runner.invoke(app, [*args, "--out", str(out), "--method", "saliency", "--no-metrics"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["size"] == 16
    assert load_file(str(out / "maps" / "shape0.safetensors"))["saliency"].shape == (3, 16, 16)


def test_a_torchvision_model_without_weights_says_it_is_random(workspace, tmp_path):
    out = tmp_path / "run"
    args = ["explain", "--model", "squeezenet1_1", "--classes", "3", "--images", str(workspace / "images")]
    args += ["--out", str(out), "--size", "32", "--method", "saliency", "--no-metrics", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    warning = "warning: model: squeezenet1_1 has random weights"
    assert warning in result.stderr and "--weights PATH" in result.stderr
    notes = json.loads((out / "config.json").read_text())["notes"]
    assert "squeezenet1_1 has random weights" in notes
    assert "squeezenet1_1 has random weights" in (out / "report.html").read_text()

    from genxai.models.classifier import load_torchvision

    torch.save(load_torchvision("squeezenet1_1", classes=3).state_dict(), tmp_path / "w.pth")
    result = runner.invoke(app, [*args, "--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "w")])
    assert result.exit_code == 0, result.output
    assert "random weights" not in result.output
    assert "notes" not in json.loads((tmp_path / "w" / "config.json").read_text())


def test_weights_are_for_torchvision_models_only(workspace, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"")
    result = explain(workspace, tmp_path / "run", "--weights", str(tmp_path / "w.pth"))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: weights:") and "genxai checkpoint" in result.output
