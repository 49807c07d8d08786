"""The explain job's metrics: which ones, their per-image values and records as torchmetrics
metrics merged across processes, the failures processes exchange, and the metric files.

Under ``accelerate launch`` each process updates :class:`RunMetrics` with its own images; one
collective :meth:`RunMetrics.results` (torchmetrics' sync, every state reduced by concatenation)
gives every process the rows of all images. :func:`gather_or_raise` is the point after each batch
where processes learn of each other's failures, so none is left waiting in a collective.
"""

from __future__ import annotations

import builtins
import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from genxai import evaluation

#: The job's metrics (column name -> torchmetrics class), in the order of the metric tables.
METRIC_CLASSES: dict[str, type[evaluation.StreamingMetric]] = {
    "average_drop": evaluation.AverageDrop,
    "increase_in_confidence": evaluation.IncreaseInConfidence,
    "win_percent": evaluation.WinPercent,
    "deletion_auc": evaluation.Deletion,
    "insertion_auc": evaluation.Insertion,
    "pointing_game": evaluation.PointingGame,
    "localization_energy": evaluation.LocalizationEnergy,
}
METRICS = tuple(METRIC_CLASSES)
#: Which direction is better, from each metric class's ``higher_is_better``.
BETTER = {name: "higher" if cls.higher_is_better else "lower" for name, cls in METRIC_CLASSES.items()}
#: Metrics of one map against the model (faithfulness) and against an object mask (localisation).
FAITHFULNESS = ("average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc")
LOCALIZATION = ("pointing_game", "localization_energy")
#: Per-image records besides the metrics, merged across processes like them.
RECORDS = ("index", "process", "target", "predicted", "probability", "label", "masked")


# ----------------------------------------------------------------------------- processes


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without torch.distributed."""
    if not _distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def gather_or_raise(error: BaseException | None, payload: Any = None) -> list[Any]:
    """Every process's ``payload`` (rank order); if any process failed, the same error on all of them.

    A collective (every process calls it at the same point). ``error`` is this process's failure
    or None. Without torch.distributed (or with one process) ``error`` is raised as it is. Otherwise
    every process raises an error of the first failing process's type (RuntimeError when it cannot
    be rebuilt from its message) with its message and ``[process R of N]``; the failing process
    chains it to the original. So no process is left waiting for the others in a later collective.
    """
    _, size = world()
    if size == 1:
        if error is not None:
            raise error
        return [payload]
    described = None if error is None else (type(error).__name__, str(error))
    reports: list[Any] = [None] * size
    torch.distributed.all_gather_object(reports, (described, payload))
    failed = [(rank, report[0]) for rank, report in enumerate(reports) if report[0] is not None]
    if failed:
        first, (kind, message) = failed[0]
        text = f"{message} [process {first} of {size}]"
        cls = getattr(builtins, kind, None)
        try:
            agreed = cls(text) if isinstance(cls, type) and issubclass(cls, Exception) else None
        except Exception:
            agreed = None
        if agreed is None:
            agreed = RuntimeError(f"{kind}: {text}")
        raise agreed from error
    return [report[1] for report in reports]


# ----------------------------------------------------------------------------- per-image values


class PerImage(Metric):
    """Float columns of per-image records, a torchmetrics metric: each column a list state
    concatenated over batches and processes (``dist_reduce_fx="cat"``), like the metrics' values.

    ``update(**columns)`` takes one (N,) tensor per column; ``compute()`` returns ``{column: (M,)}``.
    Integers (image indices, classes) are exact up to 2**24.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, columns: Sequence[str], **kwargs: Any) -> None:
        if isinstance(columns, str) or not columns:
            raise ValueError(f"columns: expected a non-empty list of column names, got {columns!r}")
        super().__init__(**kwargs)
        self.columns = tuple(columns)
        for name in self.columns:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, **columns: torch.Tensor) -> None:
        """Add a batch: one (N,) tensor per column."""
        if set(columns) != set(self.columns):
            raise ValueError(f"columns: expected exactly {list(self.columns)}, got {sorted(columns)}")
        sizes = {name: torch.as_tensor(value).numel() for name, value in columns.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"columns: expected one value per image in every column, got sizes {sizes}")
        for name in self.columns:
            getattr(self, name).append(torch.as_tensor(columns[name]).detach().float().reshape(-1))

    def compute(self) -> dict[str, torch.Tensor]:
        """Every column, all batches (of all processes) concatenated."""
        result = {}
        for name in self.columns:
            state = getattr(self, name)
            result[name] = dim_zero_cat(state) if not isinstance(state, list) or state else torch.empty(0)
        return result


def _columns(metric: PerImage) -> dict[str, torch.Tensor]:
    """``metric.compute()`` with every column (N,) (torchmetrics squeezes one-element results)."""
    return {key: value.reshape(-1) for key, value in metric.compute().items()}


class RunMetrics:
    """The records and metric values of an explain run, accumulated batch by batch.

    Args:
        model: the explained classifier (the faithfulness metrics score it).
        methods: the run's method names, each with its output kind (``"map"`` is scored).
        metrics: score the maps (else only the records and seconds are kept).
        curve_steps: steps of the deletion and insertion curves.
    """

    def __init__(self, model: nn.Module, methods: dict[str, str], *, metrics: bool, curve_steps: int) -> None:
        mapped = [name for name, output in methods.items() if output == "map"]
        self.records = PerImage(RECORDS)
        self.seconds = {name: PerImage(["seconds"]) for name in methods}
        self.meters: dict[str, dict[str, Metric]] = {}
        self.wins: dict[tuple[str, str], Metric] = {}
        if not metrics:
            return
        for name in mapped:
            self.meters[name] = {
                "average_drop": evaluation.AverageDrop(model),
                "increase_in_confidence": evaluation.IncreaseInConfidence(model),
                "deletion_auc": evaluation.Deletion(model, steps=curve_steps),
                "insertion_auc": evaluation.Insertion(model, steps=curve_steps),
                "pointing_game": evaluation.PointingGame(),
                "localization_energy": evaluation.LocalizationEnergy(),
            }
        for i, a in enumerate(mapped):
            for b in mapped[i + 1 :]:
                self.wins[a, b] = evaluation.WinPercent(model)

    def drop(self, name: str) -> None:
        """Forget method ``name`` and every value involving it."""
        self.seconds.pop(name, None)
        self.meters.pop(name, None)
        self.wins = {pair: meter for pair, meter in self.wins.items() if name not in pair}

    def score(
        self, x: torch.Tensor, heat: dict[str, torch.Tensor], target: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Add one batch's maps (``heat``: every scored method's); its values ``{method: {metric: (N,)}}``."""
        values: dict[str, dict[str, torch.Tensor]] = {}
        for name, maps in heat.items():
            meters = self.meters[name]
            v = values[name] = {metric: meters[metric](x, maps, target).per_image for metric in FAITHFULNESS}
            if masks is not None:
                v.update({metric: meters[metric](maps, masks).per_image for metric in LOCALIZATION})
        credits = {
            (a, b): meter(x, heat[a], heat[b], target).per_image for (a, b), meter in self.wins.items()
        }
        for name, won in self._win_percent(credits, x.shape[0], x.device).items():
            values[name]["win_percent"] = won
        return values

    def _win_percent(
        self, credits: dict[tuple[str, str], torch.Tensor], n: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Win% of each method against every other one, averaged over the opponents."""
        names = list(self.meters)
        if len(names) < 2:
            return {}
        wins = {name: torch.zeros(n, device=device) for name in names}
        for (a, b), won in credits.items():
            wins[a] += won.to(device)
            wins[b] += 100.0 - won.to(device)
        return {name: won / (len(names) - 1) for name, won in wins.items()}

    def record(
        self, records: dict[str, torch.Tensor], seconds: dict[str, float], device: torch.device
    ) -> None:
        """Add one batch's records (the :data:`RECORDS` columns) and each method's seconds per image."""
        n = records["index"].numel()
        self.records.update(**{key: torch.as_tensor(value).to(device) for key, value in records.items()})
        for name, value in seconds.items():
            self.seconds[name].update(seconds=torch.full((n,), value, device=device))

    def results(self, image_ids: Sequence[str]) -> list[dict[str, Any]]:
        """One row per image and method of every process's images, in ``image_ids`` order.

        Merged by torchmetrics' sync: under torch.distributed a collective, every process calls it
        and gets all rows. Localisation values are included when every image came with a mask.
        """
        if not self.records.update_called and not _distributed():
            return []
        records = _columns(self.records)
        n = records["index"].numel()
        if n == 0:
            return []
        seconds = {name: _columns(meter)["seconds"] for name, meter in self.seconds.items()}
        masked = bool(records["masked"].all())
        values = {
            name: {
                metric: meter.compute().per_image
                for metric, meter in meters.items()
                if masked or metric not in LOCALIZATION
            }
            for name, meters in self.meters.items()
        }
        credits = {pair: meter.compute().per_image for pair, meter in self.wins.items()}
        for name, won in self._win_percent(credits, n, records["index"].device).items():
            values[name]["win_percent"] = won
        sizes = {v.numel() for v in [*seconds.values(), *(m for d in values.values() for m in d.values())]}
        if sizes - {n}:
            raise RuntimeError(f"results: {n} images recorded but metric values of sizes {sorted(sizes)}")
        order = torch.argsort(records["index"].cpu(), stable=True)
        records = {key: value.cpu()[order] for key, value in records.items()}
        seconds = {name: value.cpu()[order] for name, value in seconds.items()}
        values = {name: {k: v.cpu()[order] for k, v in d.items()} for name, d in values.items()}
        return table_rows([image_ids[int(i)] for i in records["index"]], records, seconds, values)


def table_rows(
    ids: Sequence[str],
    records: dict[str, torch.Tensor],
    seconds: dict[str, torch.Tensor],
    values: dict[str, dict[str, torch.Tensor]],
) -> list[dict[str, Any]]:
    """One row per image and method (the methods of ``seconds``), from per-image tensors."""
    records = {key: torch.as_tensor(value).detach().float().cpu() for key, value in records.items()}
    table = []
    for i, image_id in enumerate(ids):
        for name in seconds:
            row: dict[str, Any] = {
                "image": image_id,
                "method": name,
                "process": int(records["process"][i]),
                "target": int(records["target"][i]),
                "predicted": int(records["predicted"][i]),
                "probability": float(records["probability"][i]),
                "seconds": float(seconds[name][i]),
            }
            if not math.isnan(float(records["label"][i])):
                row["label"] = int(records["label"][i])
            row.update({metric: float(v[i]) for metric, v in values.get(name, {}).items()})
            table.append(row)
    return table


# ----------------------------------------------------------------------------- metrics files


def summarize(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """One record per method: images explained, mean seconds per image and the mean of each metric."""
    summary = []
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        if not mine:
            continue
        record: dict[str, Any] = {"method": name, "images": len(mine)}
        record["ms_per_image"] = 1000.0 * sum(r["seconds"] for r in mine) / len(mine)
        for metric in METRICS:
            values = [r[metric] for r in mine if r.get(metric) is not None and not math.isnan(r[metric])]
            if values:
                record[metric] = sum(values) / len(values)
        summary.append(record)
    return summary


def _write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def write_metrics(
    out: str | Path, rows: Sequence[dict[str, Any]], methods: Sequence[str], skipped: dict[str, str]
) -> dict[str, Any]:
    """``metrics.json`` (summary, per-image rows, skipped methods), ``metrics.csv`` and
    ``metrics_per_image.csv`` in ``out``; returns the JSON content."""
    out = Path(out)
    summary = summarize(rows, methods)
    content = {
        "methods": [r["method"] for r in summary],
        "better": {m: BETTER[m] for m in METRICS if any(m in r for r in summary)},
        "summary": summary,
        "skipped": skipped,
        "per_image": list(rows),
    }
    (out / "metrics.json").write_text(json.dumps(content, indent=1))
    _write_csv(out / "metrics.csv", summary)
    _write_csv(out / "metrics_per_image.csv", rows)
    return content


__all__ = [
    "BETTER",
    "METRICS",
    "METRIC_CLASSES",
    "PerImage",
    "RunMetrics",
    "gather_or_raise",
    "summarize",
    "table_rows",
    "world",
    "write_metrics",
]
