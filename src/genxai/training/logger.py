"""What a training run writes while it trains: ``metrics.csv``, TensorBoard and ``evals.jsonl``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsLogger:
    """``metrics.csv`` (fixed ``columns``) + TensorBoard (x axis: ``x_key``) + ``evals.jsonl``.

    Only the main process writes (``enabled``); every process keeps the evaluation records it was
    given, so a run's summary is the same everywhere. Appends to the files of a resumed run.
    """

    def __init__(self, run_dir: Path, columns: Sequence[str], x_key: str, enabled: bool):
        self.enabled = enabled
        self.x_key = x_key
        self.columns = tuple(columns)
        self.evals: list[dict[str, Any]] = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.writer = SummaryWriter(str(run_dir / "tb"))
        path = run_dir / "metrics.csv"
        new = not path.is_file()
        self.csv_file = open(path, "a", newline="")  # noqa: SIM115 (closed in close())
        self.csv = csv.DictWriter(self.csv_file, fieldnames=self.columns, extrasaction="ignore")
        if new:
            self.csv.writeheader()

    def log(self, row: dict[str, Any]) -> None:
        """One row of training values; numbers also go to TensorBoard under ``train/``."""
        if not self.enabled:
            return
        self.csv.writerow(row)
        self.csv_file.flush()
        for key, value in row.items():
            if key not in ("iteration", self.x_key) and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, row[self.x_key])

    def log_eval(self, record: dict[str, Any]) -> None:
        """One evaluation: ``record["metrics"]`` at ``record[x_key]``."""
        self.evals.append(record)
        if not self.enabled:
            return
        with open(self.run_dir / "evals.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record["metrics"].items():
            self.writer.add_scalar(f"eval/{name}", value, record[self.x_key])

    def close(self) -> None:
        if self.enabled:
            self.csv_file.close()
            self.writer.close()
