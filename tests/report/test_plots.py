"""Charts of a diffusion ablation, drawn from its results and snapshots by genxai.report.plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from genxai.report.plots import ablation_figures, file_label, load_snapshot, plot_attention, plot_metric

FID = "FID (offline shapes-classifier features)"


def _snapshot(path, processes: int, attention: bool) -> str:
    torch.manual_seed(processes)
    tensors = {
        "x0": torch.rand(3, 3, 8, 8) * 2 - 1,
        "x0_hat": torch.rand(3, 3, 8, 8) * 2 - 1,
        "t": torch.tensor([5, 9, 2]),
        "saliency": torch.rand(3, 1, 8, 8),
        "weight": torch.rand(3, 1, 8, 8) + 0.5,
    }
    if attention:
        tensors |= {"attention_level0": torch.rand(3, 1, 8, 8), "attention_level1": torch.rand(3, 1, 4, 4)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"processes": str(processes)})
    return str(path)


def _run(root, label: str, *, snapshots: int, attention: bool) -> dict:
    run_dir = root / file_label(label)
    (run_dir / "samples").mkdir(parents=True)
    grid = run_dir / "samples" / "iter_000006.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(grid)
    return {
        "variant": label,
        "loss_weighting": "none",
        "run_dir": str(run_dir),
        "processes": 6,
        "train_time_s": 2.0,
        "processes_per_s": 3.0,
        "evals": [
            {"iteration": i, "processes": 2 * i, "train_time_s": 0.5 * i, "metrics": {FID: 10.0 - i}}
            for i in (1, 2, 3)
        ],
        "final": {FID: 7.0},
        "sample_grids": [str(grid)],
        "snapshots": [
            _snapshot(run_dir / "snapshots" / f"iter_{i:06d}.safetensors", 2 * i, attention)
            for i in range(snapshots)
        ],
    }


@pytest.fixture
def results(tmp_path):
    return {
        "fid_name": FID,
        "runs": {
            "baseline": _run(tmp_path, "baseline", snapshots=0, attention=False),
            "noise": _run(tmp_path, "noise", snapshots=2, attention=False),
            "noise+hierarchical": _run(tmp_path, "noise+hierarchical", snapshots=8, attention=True),
        },
    }


def test_ablation_figures_are_drawn_from_the_results(tmp_path, results):
    figures = ablation_figures(tmp_path, results)
    assert figures == {
        "fid_vs_processes": "fid_vs_processes.png",
        "fid_vs_time": "fid_vs_time.png",
        "samples": "samples.png",
        "maps_noise": "maps_noise.png",  # no attention maps: no attention figure
        "maps_noise+hierarchical": "maps_noise_hierarchical.png",
        "attention_noise+hierarchical": "attention_noise_hierarchical.png",
    }
    for path in figures.values():
        with Image.open(tmp_path / path) as image:
            assert image.width > 100 and image.height > 100, path


def test_nothing_to_draw_writes_nothing(tmp_path, results):
    assert plot_metric(results["runs"], None, "processes", "Processes", tmp_path / "a.png") is None
    snapshot = results["runs"]["noise"]["snapshots"][0]
    assert plot_attention("noise", snapshot, tmp_path / "b.png") is None
    assert not list(tmp_path.glob("*.png"))
    no_runs = {"fid_name": None, "runs": {"r": {**results["runs"]["baseline"], "sample_grids": []}}}
    assert ablation_figures(tmp_path / "empty", no_runs) == {}


def test_load_snapshot(results):
    tensors, meta = load_snapshot(results["runs"]["noise+hierarchical"]["snapshots"][-1])
    assert meta == {"processes": "14"} and tensors["attention_level1"].shape == (3, 1, 4, 4)


def test_draw_ablation_figures_records_them_in_results_json(tmp_path, results):
    from genxai.jobs.diffusion import draw_ablation_figures  # the job that calls the plots

    (tmp_path / "results.json").write_text(json.dumps({**results, "figures": {"stale": "gone.png"}}))
    drawn = draw_ablation_figures(tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == drawn and stored["runs"] == results["runs"]
    assert set(stored["figures"]) >= {"fid_vs_processes", "samples", "attention_noise+hierarchical"}
    assert "stale" not in stored["figures"]
    assert all((tmp_path / p).is_file() for p in stored["figures"].values())
    interrupted = {"interrupted": True}  # no finished run: nothing drawn, nothing written
    assert draw_ablation_figures(tmp_path / "none", interrupted) == interrupted
    assert not (tmp_path / "none").exists()


def _drawn(monkeypatch):
    """Keep every matplotlib Figure the plots save."""
    from genxai.report import plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi: (figures.append(fig), save(fig, path, dpi))[1])
    return figures


def test_every_map_panel_has_a_colour_bar(tmp_path, results, monkeypatch):
    """S, w and each attention level carry their own colour bar; the images (x0, x0_hat) none."""
    from genxai.report.plots import plot_maps

    figures = _drawn(monkeypatch)
    run = results["runs"]["noise+hierarchical"]
    plot_maps("nh", run["snapshots"][:3], tmp_path / "maps.png")
    plot_attention("nh", run["snapshots"][-1], tmp_path / "attention.png")
    maps, attention = figures
    bars = [ax for ax in maps.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3 * 2  # rows x (S, w)
    assert [ax.get_label() for ax in attention.axes].count("<colorbar>") == 3 * 2  # images x levels
    for bar in bars:  # each bar spans its own panel's values
        image = bar._colorbar.mappable
        low, high = image.get_clim()
        assert low == pytest.approx(float(image.get_array().min())) and high > low


def test_real_images_figure(tmp_path):
    from genxai.data.shapes import ShapesDataset
    from genxai.report.figures import real_images_figure

    data = ShapesDataset(10, 8, 0)
    path = real_images_figure(data, tmp_path / "real.png", count=10, columns=4, tile=16)
    pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
    assert pixels.shape == (3, 2 + 3 * (16 + 2), 2 + 4 * (16 + 2))  # 3 rows of 4 tiles, 2-px gaps
    first = pixels[:, 2:18, 2:18]  # the first image, enlarged 2x (nearest)
    expected = data[0][0].repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.allclose(first, expected, atol=1 / 255)
    assert torch.all(pixels[:, -18:-2, -18:-2] == 1.0)  # the last row ends in white cells
    grey = real_images_figure(torch.rand(3, 1, 5, 5), tmp_path / "grey.png")
    assert Image.open(grey).mode == "RGB"
    with pytest.raises(ValueError, match="images"):
        real_images_figure(torch.rand(5, 5), tmp_path / "bad.png")
