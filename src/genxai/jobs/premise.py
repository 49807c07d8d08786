"""Where D looks: the premise check on an ablation's trained discriminators, as report sections.

    results = premise_experiment("runs/shapes-ablation")   # -> premise.json + premise_<run>.png
    sections = premise_sections("runs/shapes-ablation")

For every guided run of the ablation's first seed, its final D judges held-out real images with a
corrupted square (:func:`genxai.diffusion.premise.artifact_localization`, each corruption in
turn); the share of D's fake-saliency energy on the square (Loc), the pointing game and the chance
level are written to ``premise.json`` with one figure per run (rows: corrupted images, then D's
saliency over them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from genxai.diffusion.config import build_dataset
from genxai.diffusion.pipeline import load_run
from genxai.diffusion.premise import CORRUPTIONS, artifact_localization
from genxai.report.figures import grid, overlay, save_png, to_rgb
from genxai.report.html import MINMAX, Colorbar, Picture, Section, Table
from genxai.report.plots import file_label


def premise_experiment(
    root: str | Path, *, images: int = 256, patch: int = 4, corruptions: Sequence[str] = CORRUPTIONS
) -> dict[str, Any]:
    """Run the premise check on every guided run of the ablation in ``root`` (first seed)."""
    root = Path(root)
    results = json.loads((root / "results.json").read_text())
    first_seed = results.get("seeds", [None])[0]
    out: dict[str, Any] = {"images": images, "patch": patch, "runs": {}}
    for rid, run in results["runs"].items():
        if "dg" in run or run.get("seed", first_seed) != first_seed:
            continue
        loaded = load_run(run["run_dir"])
        if loaded.discriminator is None:
            continue
        cfg = loaded.cfg
        data = build_dataset(cfg, train=False)  # held-out images: D never saw them
        real = torch.stack([data[i][0] for i in range(min(images, len(data)))]).float() * 2 - 1
        g = cfg.guidance
        rows, figure_rows = {}, []
        for corruption in corruptions:
            r = artifact_localization(
                loaded.discriminator,
                real,
                corruption=corruption,
                patch=patch,
                method=g.saliency_method,
                **g.saliency_options,
            )
            rows[corruption] = {k: r[k] for k in ("energy", "pointing", "chance", "fake_score_rise")}
            pictures = to_rgb(((r["images"][:8] + 1) / 2).clamp(0, 1))
            figure_rows += [pictures, overlay(pictures, r["maps"][:8], cmap="inferno")]
        path = save_png(grid(torch.stack(figure_rows)), root / f"premise_{file_label(rid)}.png", min_size=256)
        out["runs"][rid] = {"label": run.get("label", rid), "corruptions": rows, "figure": path.name}
    (root / "premise.json").write_text(json.dumps(out, indent=2))
    return out


def premise_sections(root: str | Path) -> list[Section]:
    """The premise check's table and figures, if ``root/premise.json`` exists."""
    root = Path(root)
    path = root / "premise.json"
    if not path.is_file():
        return []
    premise = json.loads(path.read_text())
    records = [
        {
            "run": rid,
            "corruption": corruption,
            "saliency energy on the square (Loc)": row["energy"],
            "pointing game": row["pointing"],
            "chance (square's area share)": row["chance"],
            "D logit drop": row["fake_score_rise"],
        }
        for rid, run in premise["runs"].items()
        for corruption, row in run["corruptions"].items()
    ]
    text = (
        f"Each of {premise['images']} held-out real images gets one corrupted {premise['patch']}x"
        f"{premise['patch']} square (a known artifact); the run's final D judges them. Loc: the share of "
        "D's fake-saliency energy inside the square; chance: what an evenly spread map would get. "
        "Figure rows per corruption (noise, blur, colour, flat): the corrupted images, then D's saliency."
    )
    bar = Colorbar("inferno", "0 (least)", "1 (most)", f"D's fake-score saliency, {MINMAX}")
    pictures = [Picture((root / run["figure"]).resolve(), rid, bar) for rid, run in premise["runs"].items()]
    return [
        Section(
            "Where D looks: saliency on planted artifacts",
            text=text,
            table=Table.from_records(records),
            images=pictures,
        )
    ]
