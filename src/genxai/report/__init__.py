"""Figures (colour maps, overlays, grids) and the HTML report built from sections."""

from genxai.report.figures import (
    as_heatmap,
    colorize,
    grid,
    overlay,
    real_images_figure,
    save_png,
    to_pil,
    to_rgb,
    upscale,
    with_colorbar,
)
from genxai.report.html import (
    LOAD_NOTE,
    MINMAX,
    Colorbar,
    Grid,
    Picture,
    Section,
    Table,
    build_report,
    format_value,
)

__all__ = [
    "LOAD_NOTE",
    "MINMAX",
    "Colorbar",
    "Grid",
    "Picture",
    "Section",
    "Table",
    "as_heatmap",
    "build_report",
    "colorize",
    "format_value",
    "grid",
    "overlay",
    "real_images_figure",
    "save_png",
    "to_pil",
    "to_rgb",
    "upscale",
    "with_colorbar",
]
