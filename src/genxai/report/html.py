"""A self-contained HTML report built from sections, so any job can add its own.

    build_report(run_dir, [
        Section("Explanations", grid=Grid(columns=["image", "gradcam"], rows=["cat"], cells=[["a.png", "b.png"]])),
        Section("Metrics", table=Table.from_records([{"method": "gradcam", "average_drop": 12.3}])),
        Section("Run config", config={"model": "resnet18"}),
    ])

Image paths are relative to ``run_dir`` (or absolute); the report references them relatively, so the
run folder can be moved as a whole, or with ``embed=True`` inlines them as base64 in one file.
Pictures and grids of maps carry a :class:`Colorbar` (drawn under them, or ``in_figure`` when the
picture draws its own); every picture opens at full size on click; wide grids scroll inside their
box; configs are folded; a table column can carry a note (e.g. :data:`LOAD_NOTE` on speeds).
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

import genxai

LOAD_NOTE = "wall-clock time on the machine that ran it: it depends on that machine's load and hardware"
"""The note of every speed or time column."""


@dataclass
class Colorbar:
    """The colour scale of a map figure: ``cmap`` from ``low`` to ``high`` (labels), ``label``
    saying what the colour means. ``in_figure``: the picture draws its own colour bars (matplotlib
    figures); the report then marks the figure as a map without adding one."""

    cmap: str = "jet"
    low: str = "0"
    high: str = "1"
    label: str = ""
    in_figure: bool = False

    def gradient(self, stops: int = 11) -> str:
        """A CSS ``linear-gradient`` through the colormap (left = low)."""
        from genxai.report.figures import _lookup_table

        table = _lookup_table(self.cmap)
        colours = [table[round(i * 255 / (stops - 1))] for i in range(stops)]
        return (
            "linear-gradient(to right, "
            + ", ".join("#" + "".join(f"{round(float(c) * 255):02x}" for c in rgb) for rgb in colours)
            + ")"
        )


MINMAX = "per-image min-max scaled map: 0 = its lowest, 1 = its highest value"
"""The :class:`Colorbar` label of min-max scaled attribution maps."""


@dataclass
class Picture:
    """One image with a caption; ``colorbar`` when it shows a map."""

    path: str | Path
    caption: str = ""
    colorbar: Colorbar | None = None


@dataclass
class Grid:
    """Rows x columns of images with labels (``None`` leaves a cell empty); ``colorbar`` for the
    scale of its map columns."""

    columns: list[str]
    rows: list[str]
    cells: list[list[str | Path | None]]
    colorbar: Colorbar | None = None

    def __post_init__(self) -> None:
        if len(self.cells) != len(self.rows) or any(len(r) != len(self.columns) for r in self.cells):
            raise ValueError(
                f"cells: expected {len(self.rows)} rows of {len(self.columns)} paths, "
                f"got {[len(r) for r in self.cells]}"
            )


@dataclass
class Table:
    """A table of values; numbers are shown with 4 significant digits. ``notes``: column -> a note,
    marked in the header and printed under the table."""

    columns: list[str]
    rows: list[list[Any]]
    notes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], notes: dict[str, str] | None = None) -> Table:
        columns = list(dict.fromkeys(key for record in records for key in record))
        rows = [[record.get(c) for c in columns] for record in records]
        return cls(columns, rows, {k: v for k, v in (notes or {}).items() if k in columns})

    def marked(self) -> tuple[list[str], list[str]]:
        """Header labels with a mark on noted columns, and the footnotes (one per distinct note)."""
        marks = ["*", "\u2020", "\u2021", "\u00a7"]
        footnotes: dict[str, str] = {}
        for note in self.notes.values():
            footnotes.setdefault(
                note, marks[len(footnotes) % len(marks)] * (1 + len(footnotes) // len(marks))
            )
        headers = [f"{c} {footnotes[self.notes[c]]}" if c in self.notes else c for c in self.columns]
        return headers, [f"{mark} {note}" for note, mark in footnotes.items()]


@dataclass
class Section:
    """A titled part of the report: free text, pictures, an image grid, a table and/or a config."""

    title: str
    text: str = ""
    images: list[Picture] = field(default_factory=list)
    grid: Grid | None = None
    table: Table | None = None
    config: dict[str, Any] | None = None


def format_value(value: Any) -> str:
    """Numbers to 4 significant digits; None/NaN as an en dash; anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "\u2013"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted ``key: value`` rows; lists as JSON."""
    rows: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.update(flatten_config(value, name + "."))
        else:
            rows[name] = json.dumps(value) if isinstance(value, (list, tuple, dict)) else format_value(value)
    return rows


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("genxai.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["value"] = format_value
    return env


class _Sources:
    """Turns image paths into ``src`` attributes: relative to the report, or base64 data URIs."""

    def __init__(self, run_dir: Path, report_dir: Path, embed: bool):
        self.run_dir, self.report_dir, self.embed = run_dir, report_dir, embed
        self.missing: list[str] = []

    def __call__(self, path: str | Path | None) -> str | None:
        if path is None:
            return None
        file = Path(path) if Path(path).is_absolute() else self.run_dir / path
        if not file.is_file():
            self.missing.append(str(path))
            return None
        if self.embed:
            kind = {".jpg": "jpeg", ".jpeg": "jpeg", ".svg": "svg+xml"}.get(file.suffix.lower(), "png")
            return f"data:image/{kind};base64," + base64.b64encode(file.read_bytes()).decode("ascii")
        return Path(os.path.relpath(file, self.report_dir)).as_posix()


def _colorbar(bar: Colorbar | None) -> dict[str, Any] | None:
    if bar is None:
        return None
    return {**bar.__dict__, "gradient": "" if bar.in_figure else bar.gradient()}


def build_report(
    run_dir: str | Path,
    sections: Sequence[Section],
    *,
    title: str | None = None,
    embed: bool = False,
    filename: str = "report.html",
) -> Path:
    """Render ``sections`` to ``run_dir/filename`` and return its path.

    Raises FileNotFoundError when ``run_dir`` is missing or an image of a section does not exist.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir: no folder at {run_dir}")
    if not sections:
        raise ValueError(f"sections: nothing to report for {run_dir}")
    out = run_dir / filename
    src = _Sources(run_dir, out.parent, embed)
    rendered = [
        {
            "title": s.title,
            "anchor": f"section-{i}",
            "text": s.text,
            "images": [
                {"src": src(p.path), "caption": p.caption, "colorbar": _colorbar(p.colorbar)}
                for p in s.images
            ],
            "grid": s.grid
            and {
                "columns": s.grid.columns,
                "rows": [
                    {"label": label, "cells": [src(c) for c in cells]}
                    for label, cells in zip(s.grid.rows, s.grid.cells)
                ],
                "colorbar": _colorbar(s.grid.colorbar),
            },
            "table": s.table and dict(zip(("headers", "footnotes"), s.table.marked()), rows=s.table.rows),
            "config": s.config and flatten_config(s.config),
        }
        for i, s in enumerate(sections)
    ]
    if src.missing:
        shown = ", ".join(src.missing[:5]) + (" ..." if len(src.missing) > 5 else "")
        raise FileNotFoundError(f"sections: {len(src.missing)} image(s) not found under {run_dir}: {shown}")
    page = (
        _environment()
        .get_template("report.html")
        .render(
            title=title or f"genxai report: {run_dir.resolve().name}",
            sections=rendered,
            version=genxai.__version__,
            created=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
