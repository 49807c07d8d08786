"""Figures (colour maps, overlays, grids) and the HTML report built from sections."""

from genxai.report.figures import as_heatmap, colorize, grid, overlay, save_png, to_pil, to_rgb, upscale
from genxai.report.html import Grid, Picture, Section, Table, build_report, format_value

__all__ = [
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
    "save_png",
    "to_pil",
    "to_rgb",
    "upscale",
]
