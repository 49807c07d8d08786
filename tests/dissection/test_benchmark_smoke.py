"""benchmarks/dissection.py still runs (``--quick``); its numbers are not checked, only that both
sides agree on the dissection they time."""

from __future__ import annotations

from tests.test_benchmarks_smoke import load


def test_dissection_benchmark_runs(capsys):
    results = load("dissection").main(["--quick", "--samples", "32", "--no-memory"])
    out = capsys.readouterr().out
    assert "| samples | genxai img/s | naive img/s | ratio | same concept | max IoU diff |" in out
    (row,) = results["rows"]
    assert row["samples"] == 32 and row["same"] >= 0.75 and row["iou_diff"] < 0.05
