"""Figures (colour maps, overlays, grids, PNGs) and the HTML report, rendered in headless Chromium."""

from __future__ import annotations

import html
import shutil
import subprocess

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from genxai.report import (
    Grid,
    Picture,
    Section,
    Table,
    as_heatmap,
    build_report,
    colorize,
    format_value,
    grid,
    overlay,
    save_png,
    to_pil,
    upscale,
)


def test_colorize_matches_matplotlib():
    torch.manual_seed(0)
    maps = torch.rand(2, 1, 5, 7)
    for cmap in ("jet", "inferno"):
        expected = matplotlib.colormaps[cmap](np.round(maps[:, 0].numpy() * 255) / 255)[..., :3]
        got = colorize(maps, cmap).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="colormap"):
        colorize(maps, "not-a-map")


def test_as_heatmap_reduces_channels_and_scales():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 1, 0, 0] = -5.0  # largest magnitude, negative
    maps[0, 2, 1, 1] = 2.0
    heat = as_heatmap(maps)
    assert heat.shape == (2, 1, 4, 4)
    assert heat[0, 0, 0, 0] == 1.0 and heat[0, 0, 1, 1] == pytest.approx(0.4)
    assert torch.all(heat[1] == 0)  # a flat map stays zero, never NaN
    with pytest.raises(ValueError, match="maps"):
        as_heatmap(torch.zeros(4, 4))


def test_overlay_blends_and_resizes():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    maps = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(overlay(images, maps, alpha=0.0), images)
    torch.testing.assert_close(overlay(images, maps, alpha=1.0), colorize(as_heatmap(maps)))
    grey = overlay(images[:, :1], torch.rand(2, 1, 4, 4))  # grey input, low-resolution map
    assert grey.shape == (2, 3, 8, 8) and grey.min() >= 0 and grey.max() <= 1


def test_grid_places_tiles():
    tiles = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1, 1).expand(2, 3, 3, 4, 5) / 10
    image = grid(tiles, pad=2, fill=1.0)
    assert image.shape == (3, 2 * (4 + 2) + 2, 3 * (5 + 2) + 2)
    for r in range(2):
        for c in range(3):
            top, left = 2 + r * 6, 2 + c * 7
            assert torch.all(image[:, top : top + 4, left : left + 5] == (3 * r + c) / 10)
    assert torch.all(image[:, :2] == 1.0)


def test_png_round_trip(tmp_path):
    image = torch.rand(3, 6, 6)
    path = save_png(image, tmp_path / "sub" / "a.png", min_size=12)
    loaded = np.asarray(Image.open(path))
    assert loaded.shape == (12, 12, 3)
    expected = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(loaded[::2, ::2], expected)
    assert upscale(image, 4).shape == image.shape
    assert to_pil(torch.rand(1, 4, 4)).mode == "L"


def _run(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    heat = overlay(images, torch.rand(2, 1, 16, 16))
    for i in range(2):
        save_png(images[i], tmp_path / "images" / f"img{i}.png", min_size=64)
        save_png(heat[i], tmp_path / "overlays" / "gradcam" / f"img{i}.png", min_size=64)
    return [
        Section("Notes", text="A <b>bold</b> claim & more."),
        Section("Pictures", images=[Picture("images/img0.png", "first")]),
        Section(
            "Explanations",
            grid=Grid(
                columns=["input", "gradcam"],
                rows=["img0", "img1"],
                cells=[[f"images/img{i}.png", f"overlays/gradcam/img{i}.png"] for i in range(2)],
            ),
        ),
        Section("Metrics", table=Table.from_records([{"method": "gradcam", "average_drop": 12.3456789}])),
        Section("Run config", config={"model": "resnet18", "train": {"epochs": 3}, "methods": ["a", "b"]}),
    ]


def test_build_report_sections(tmp_path):
    path = build_report(tmp_path, _run(tmp_path), title="My run")
    page = path.read_text()
    assert path == tmp_path / "report.html"
    for text in ("My run", "Explanations", "gradcam", "12.35", "train.epochs", '["a", "b"]'):
        assert text in html.unescape(page)
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # text is escaped
    assert 'src="overlays/gradcam/img1.png"' in page
    embedded = build_report(tmp_path, _run(tmp_path), embed=True, filename="one.html").read_text()
    assert "data:image/png;base64," in embedded and 'src="images/' not in embedded


def test_build_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_report(tmp_path, [Section("x", images=[Picture("missing.png")])])
    with pytest.raises(FileNotFoundError, match="run_dir"):
        build_report(tmp_path / "nope", [Section("x")])
    with pytest.raises(ValueError, match="cells"):
        Grid(columns=["a"], rows=["r"], cells=[["x", "y"]])
    assert format_value(0.000123456) == "0.0001235" and format_value(None) == "\u2013"


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian package 'chromium')")
def test_report_renders_in_headless_chromium(tmp_path):
    report = build_report(tmp_path, _run(tmp_path))
    shot = tmp_path / "shot.png"
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        report.resolve().as_uri(),
    ]
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert pixels.var() > 0
    # The jet overlays loaded: strongly saturated pixels exist (text and tables are grey/blue only).
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 150).sum() > 1000
