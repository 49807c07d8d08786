"""Figures (colour maps, overlays, grids, PNGs) and the HTML report, rendered in headless Chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from genxai.report import (
    Colorbar,
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
from genxai.report.html import LOAD_NOTE


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


def _run(tmp_path, methods: int = 1):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    heat = overlay(images, torch.rand(2, 1, 16, 16))
    for i in range(2):
        save_png(images[i], tmp_path / "images" / f"img{i}.png", min_size=64)
        save_png(heat[i], tmp_path / "overlays" / "gradcam" / f"img{i}.png", min_size=64)
    save_png(torch.rand(3, 20, 30), tmp_path / "big.png", min_size=600)  # 600 x 900 px
    columns = ["gradcam"] + [f"method{k}" for k in range(1, methods)]  # many methods: a wide grid
    return [
        Section("Notes", text="A <b>bold</b> claim & more."),
        Section(
            "Pictures",
            images=[
                Picture("images/img0.png", "first"),
                Picture("big.png", "a big chart"),
                Picture(
                    "overlays/gradcam/img0.png", "a map", colorbar=Colorbar("jet", "low", "high", "scaled")
                ),
                Picture("overlays/gradcam/img1.png", "a chart", colorbar=Colorbar(in_figure=True)),
            ],
        ),
        Section(
            "Explanations",
            grid=Grid(
                columns=["input", *columns],
                rows=["img0", "img1"],
                cells=[
                    [f"images/img{i}.png", *[f"overlays/gradcam/img{i}.png"] * len(columns)] for i in range(2)
                ],
                colorbar=Colorbar("inferno"),
            ),
        ),
        Section(
            "Metrics",
            table=Table.from_records(
                [{"method": "gradcam", "average_drop": 12.3456789, "ms_per_image": 3.0}],
                notes={"ms_per_image": LOAD_NOTE, "not a column": "dropped"},
            ),
        ),
        Section(
            "Run config",
            config={"model": "resnet18", "train": {f"key{k}": k for k in range(40)}, "methods": ["a", "b"]},
        ),
    ]


def test_build_report_sections(tmp_path):
    path = build_report(tmp_path, _run(tmp_path), title="My run")
    page = path.read_text()
    assert path == tmp_path / "report.html"
    for text in ("My run", "Explanations", "gradcam", "12.35", "train.key39", '["a", "b"]'):
        assert text in html.unescape(page)
    assert "&lt;b&gt;bold&lt;/b&gt;" in page  # text is escaped
    assert 'src="overlays/gradcam/img1.png"' in page
    embedded = build_report(tmp_path, _run(tmp_path), embed=True, filename="one.html").read_text()
    assert "data:image/png;base64," in embedded and 'src="images/' not in embedded
    # map figures carry a colour bar: the colormap's own colours, ends labelled
    jet = matplotlib.colormaps["jet"]
    first, last = (matplotlib.colors.to_hex(jet(x)) for x in (0.0, 1.0))
    assert re.search(rf"linear-gradient\(to right, {first}.*{last}\)", page)
    assert page.count('class="colorbar"') == 3 and 'data-colorbar="in-figure"' in page
    # the config is folded, speed columns carry the load note, pictures open at full size on click
    assert re.search(r"<details class=\"config\">\s*<summary>42 settings", page)
    assert "ms_per_image *" in page and f"* {LOAD_NOTE}" in html.unescape(page)
    assert "dropped" not in page
    assert 'id="zoom"' in page and 'addEventListener("click"' in page


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


PROBE = """<script>
window.addEventListener("load", function () {
  var maps = Array.from(document.querySelectorAll("figure.map"));
  var boxes = Array.from(document.querySelectorAll("table.grid")).map(function (t) { return t.parentElement; });
  var out = {
    width: document.documentElement.scrollWidth,
    content: Math.max.apply(null, Array.from(document.querySelectorAll("main *")).filter(function (e) {
      return !e.parentElement.closest(".scroll"); }).map(function (e) { return e.getBoundingClientRect().right; })),
    maps: maps.length,
    without_colorbar: maps.filter(function (f) { return !f.querySelector(".colorbar"); }).length,
    grid_boxes: boxes.map(function (b) { return [b.scrollWidth, b.clientWidth, getComputedStyle(b).overflowX]; }),
    zoom_before: document.getElementById("zoom").hidden
  };
  var big = Array.from(document.querySelectorAll("main img")).sort(function (a, b) {
    return b.naturalWidth - a.naturalWidth; })[0];
  out.shown_width = big.getBoundingClientRect().width;
  big.click();
  var zoom = document.getElementById("zoom");
  out.zoom_after = zoom.hidden;
  out.zoom_width = zoom.querySelector("img").getBoundingClientRect().width;
  out.natural_width = zoom.querySelector("img").naturalWidth;
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body>"""


def chromium_probe(report, width: int = 1280) -> dict:
    """Measure a report in headless Chromium: page width, map figures without a colour bar, grid
    boxes, the full-size view (a copy of the page with a measuring script, its DOM dumped)."""
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", PROBE))
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900"]
    command += ["--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout)
    assert found, result.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian package 'chromium')")
def test_report_layout_in_headless_chromium(tmp_path):
    """Every map figure has a colour bar element; a grid of 30 methods scrolls inside its box and
    the page stays within 1400 px; a click opens a picture at full size."""
    report = build_report(tmp_path, _run(tmp_path, methods=30))
    for window in (1280, 1900):
        seen = chromium_probe(report, window)
        assert seen["maps"] == 3 and seen["without_colorbar"] == 0, seen
        assert seen["width"] <= window and seen["content"] <= 1400, seen  # no sideways scrolling
        ((inner, box, overflow),) = seen["grid_boxes"]
        assert inner > 31 * 112 > box and overflow == "auto", seen  # the grid scrolls in its box
        assert (
            seen["zoom_before"] is True
            and seen["zoom_after"] is False
            and seen["zoom_width"] == seen["natural_width"] == 900
            and seen["shown_width"] <= 482  # 480 + the border
        ), seen  # the picture, shown at most 480 px wide on the page, opens at its own 900 px


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


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian package 'chromium')")
@pytest.mark.filterwarnings("ignore:ClassModelVisualization. the result is constant")  # a random model
def test_explain_report_in_headless_chromium(tmp_path):
    """A real explain run's report: the images explained as a grid, a colour bar on the map grid
    (saying which columns are images, not maps), the speed note, within 1400 px."""
    from genxai.data.shapes import generate_shapes
    from genxai.jobs.explain import ExplainConfig, run_explain
    from genxai.models import SmallResNet, save_classifier

    images, _, _ = generate_shapes(3, 32, seed=5)
    for i, image in enumerate(images):
        save_png(image, tmp_path / "images" / f"s{i}.png")
    torch.manual_seed(0)
    save_classifier(SmallResNet(classes=6, width=4).eval(), tmp_path / "ckpt")
    cfg = ExplainConfig(
        model=str(tmp_path / "ckpt"),
        images=str(tmp_path / "images"),
        out=str(tmp_path / "run"),
        methods=["gradcam", "saliency", "classmodel"],
        size=32,
        device="cpu",
        curve_steps=4,
        cmap="viridis",
        options={"classmodel": {"steps": 2}},
    )
    report = run_explain(cfg, progress=False) / "report.html"
    page = html.unescape(report.read_text())
    assert "The images" in page and (tmp_path / "run" / "inputs.png").is_file()
    assert "classmodel: generated images, no map" in page and LOAD_NOTE in page
    viridis = matplotlib.colors.to_hex(matplotlib.colormaps["viridis"](0.0))
    assert f"linear-gradient(to right, {viridis}" in page  # the run's colormap
    seen = chromium_probe(report)
    assert seen["maps"] == 1 and seen["without_colorbar"] == 0 and seen["content"] <= 1400, seen


def test_with_colorbar_appends_the_colormap_and_its_ends():
    from genxai.report.figures import with_colorbar

    image = torch.rand(3, 48, 96)
    out = with_colorbar(image, "inferno", low="low", high="high", label="saliency")
    assert out.shape[0] == 3 and out.shape[2] == 96 and out.shape[1] > 48 + 6 + 14
    torch.testing.assert_close(out[:, :48], image)
    bar = out[:, 48 + 3]  # the first row of the bar, under a 3-px white gap
    table = matplotlib.colormaps["inferno"]
    for column, value in ((0, 0.0), (95, 1.0), (48, 48 / 95)):
        expected = torch.tensor(table(round(value * 255) / 255)[:3], dtype=torch.float32)
        torch.testing.assert_close(bar[:, column], expected, atol=1e-6, rtol=0)
    words = out[:, -28:]
    assert (words < 0.5).any() and (words > 0.5).any()  # the labels are written
    with pytest.raises(ValueError, match="image"):
        with_colorbar(torch.rand(1, 8, 8))
