"""The explanation job: run attribution methods over images, write overlays, raw maps and metrics.

    run_explain(ExplainConfig(model="resnet18", images="photos/", methods=["gradcam", "rise"], out="runs/x"))

A run folder holds, per image ``ID`` (its path under the image folder, ``/`` as ``__``):

* ``images/ID.png``: the input as the model saw it (resized, cropped);
* ``overlays/METHOD/ID.png``: the map over the image (class model images as they are);
* ``maps/ID.safetensors``: every method's raw output for the image, one tensor per method;

and for the whole run ``config.json``, ``metrics.json`` (per-image values, means, skipped methods),
``metrics.csv`` (one row per method), ``metrics_per_image.csv`` and ``report.html``.

Under ``accelerate launch`` every process explains its shard of the images (outputs are per image,
so processes never write the same file). The per-image metric values and records are torchmetrics
states, merged by torchmetrics' own sync; the main process then writes the metric files and the
report. After every batch the processes exchange their failures before any collective, so a method
that fails on one shard stops every process with the same error (with ``"all"``: it is skipped on
every process), instead of leaving the others waiting.
Methods are looked up in the registry at run time; ``"all"`` means every registered method, and
then a method that cannot explain this model (say CAM without a linear head) is skipped and
listed, instead of stopping the run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from genxai import attribution
from genxai.attribution.base import Attribution, LayerAttribution
from genxai.core.checks import check_positive_int
from genxai.core.engine import model_output
from genxai.core.hooks import get_module
from genxai.core.maps import minmax_normalize
from genxai.core.targets import ClassLogit
from genxai.data.folders import IMAGE_EXTENSIONS, load_image
from genxai.jobs.metrics import RunMetrics, gather_or_raise, table_rows, world, write_metrics
from genxai.models.classifier import default_layer, input_size, load_model, random_weights_note
from genxai.report.figures import as_heatmap, colorize, overlay, real_images_figure, save_png, to_rgb, upscale
from genxai.report.html import LOAD_NOTE, MINMAX, Colorbar, Grid, Picture, Section, Table, build_report


@dataclass
class ExplainConfig:
    """Everything a run needs; saved as ``config.json`` in the run folder.

    Args:
        model: a torchvision model name (``resnet18``) or a genxai checkpoint folder.
        weights: local weights file for a torchvision model (random weights when None).
        classes: number of classes of a torchvision model.
        images: folder of images (searched recursively).
        out: run folder.
        methods: registered method names, or ``["all"]``.
        layer: layer of the layer methods (CAM family, Relevance-CAM); None picks the model's last
            convolutional block.
        target: class to explain; None explains each image's predicted class.
        size: images are center-cropped and resized to ``size`` x ``size``; None: the
            checkpoint's own input size (224 for torchvision models).
        batch_size: images per batch.
        device: "auto", "cpu" or "cuda" (under accelerate, each process's own GPU).
        metrics: compute the faithfulness metrics (several forward passes per image and method).
        curve_steps: steps of the deletion and insertion curves.
        cmap: matplotlib colormap of the overlays.
        png_size: overlays smaller than this are enlarged to it (nearest for the image, bilinear
            for the map), so small images stay visible.
        options: per-method constructor options, e.g. ``{"rise": {"masks": 1000}}``.
    """

    model: str = "resnet18"
    weights: str | None = None
    classes: int = 1000
    images: str = ""
    out: str = "runs/explain"
    methods: list[str] = field(default_factory=lambda: ["gradcam"])
    layer: str | None = None
    target: int | None = None
    size: int | None = None
    batch_size: int = 16
    device: str = "auto"
    metrics: bool = True
    curve_steps: int = 32
    cmap: str = "jet"
    png_size: int = 128
    options: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- methods


def canonical_name(name: str) -> str:
    """The registered canonical name of a method given by any alias (``Grad-CAM`` -> ``gradcam``)."""
    cls = attribution.get(name)
    return next(n for n in attribution.names() if attribution.get(n) is cls)


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Canonical, de-duplicated method names; ``"all"`` expands to every registered method.

    An unknown name raises ValueError listing the known ones.
    """
    if isinstance(names, str) or not names:
        raise ValueError(f"methods: expected a non-empty list of method names, got {names!r}")
    resolved: list[str] = []
    for name in names:
        expanded = attribution.names() if name.lower() == "all" else [canonical_name(name)]
        resolved.extend(n for n in expanded if n not in resolved)
    return resolved


def method_options(options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``options`` (``{method: {option: value}}``) keyed by canonical method name, all checked.

    Every entry is checked, also of methods this run does not use, so a typo never passes silently:
    an unknown method, or an option its constructor does not take (``options.rise.maskss``), is a
    ValueError naming the method, the option and the closest accepted ones.
    """
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"options: expected {{method: {{option: value}}}}, got {options!r}")
    checked: dict[str, dict[str, Any]] = {}
    for key, values in options.items():
        try:
            name = canonical_name(key)
        except ValueError as err:
            raise ValueError(f"options: {err}") from None
        attribution.check_options(name, values)
        checked.setdefault(name, {}).update(values)
    return checked


def build_methods(
    model: nn.Module,
    names: Sequence[str],
    *,
    layer: str | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    strict: bool = True,
) -> tuple[dict[str, Attribution], dict[str, str]]:
    """Construct each named method for ``model`` with :func:`genxai.attribution.build`.

    Layer methods get ``layer`` (None: the model's default layer), or ``options[name]["layer"]``.
    ``options[name]`` are the method's constructor options, checked first (see
    :func:`method_options`; a misspelt option is always an error). With ``strict=False`` a method
    that cannot be built for this model is returned in the second dict, ``name -> reason``,
    instead of raising.
    """
    checked = method_options(options)
    methods: dict[str, Attribution] = {}
    skipped: dict[str, str] = {}
    for name in names:
        kwargs = dict(checked.get(canonical_name(name), {}))
        try:
            methods[name] = attribution.build(name, model, kwargs.pop("layer", layer), **kwargs)
        except (ValueError, TypeError) as err:
            if strict:
                raise
            skipped[name] = str(err)
    return methods, skipped


# ----------------------------------------------------------------------------- images


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted); clear errors for a missing or empty folder."""
    root = Path(folder).expanduser()
    if not str(folder):
        raise ValueError("images: no image folder given")
    if not root.exists():
        raise FileNotFoundError(f"images: no folder at {root}")
    if not root.is_dir():
        raise ValueError(f"images: {root} is a file; expected a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    return paths


def image_ids(paths: Sequence[Path], root: str | Path) -> list[str]:
    """File-system-safe ids, unique per image: the path under ``root`` without suffix, ``/`` as ``__``."""
    stems = [p.relative_to(root).with_suffix("").as_posix().replace("/", "__") for p in paths]
    dupes = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{p.suffix.lstrip('.').lower()}" if s in dupes else s for s, p in zip(stems, paths)]


def folder_batches(
    items: Sequence[tuple[str, Path]], size: int, batch_size: int, channels: int = 3
) -> Iterator[tuple[list[str], torch.Tensor, None]]:
    """``(ids, images (B, C, size, size), None)`` batches of image files."""
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        yield [i for i, _ in chunk], torch.stack([load_image(p, size, channels) for _, p in chunk]), None


# ----------------------------------------------------------------------------- explaining


class Explainer:
    """Explains batches with several methods, scores the maps and writes the per-image outputs.

    Args:
        model: a classifier with (N, classes) outputs, in eval mode, on the device of the batches.
        methods: name -> attribution method (see :func:`build_methods`).
        out: the run folder.
        target: class to explain, None for each image's predicted class.
        metrics: compute faithfulness metrics (and localisation ones when masks are given).
        strict: raise a method's error; when False the method is dropped and listed in ``skipped``.
        image_ids: every image id of the run in order (under torch.distributed, of all processes),
            so merged rows follow it; None numbers the images in the order they are seen.

    Metric values and per-image records accumulate in torchmetrics metrics as batches are run
    (:meth:`run_batch`); :meth:`results` merges them across processes; :meth:`reset` forgets them.
    """

    def __init__(
        self,
        model: nn.Module,
        methods: dict[str, Attribution],
        out: str | Path,
        *,
        target: int | None = None,
        metrics: bool = True,
        curve_steps: int = 32,
        cmap: str = "jet",
        png_size: int = 128,
        strict: bool = True,
        skipped: dict[str, str] | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> None:
        self.model, self.methods, self.out = model, dict(methods), Path(out)
        self.target, self.metrics, self.strict = target, metrics, strict
        self.curve_steps = check_positive_int(curve_steps, "curve_steps")
        self.cmap, self.png_size = cmap, png_size
        self.skipped: dict[str, str] = dict(skipped or {})
        self.fixed_ids = image_ids is not None
        self.image_ids: list[str] = list(image_ids or [])
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.reset()

    def reset(self) -> None:
        """New, empty metrics (:class:`~genxai.jobs.metrics.RunMetrics`) for the current methods."""
        outputs = {name: method.output for name, method in self.methods.items()}
        self.run_metrics = RunMetrics(self.model, outputs, metrics=self.metrics, curve_steps=self.curve_steps)

    def drop(self, name: str, reason: str) -> None:
        """Stop running method ``name`` and forget its values (listed in ``skipped`` with ``reason``)."""
        self.skipped[name] = reason
        self.methods.pop(name, None)
        self.run_metrics.drop(name)

    def _indices(self, ids: Sequence[str]) -> torch.Tensor:
        """Positions of ``ids`` among the run's images (new ids numbered on, unless they are fixed)."""
        for image_id in ids:
            if image_id not in self._index:
                if self.fixed_ids:
                    raise ValueError(f"ids: {image_id!r} is not one of the run's images")
                self._index[image_id] = len(self.image_ids)
                self.image_ids.append(image_id)
        return torch.tensor([self._index[image_id] for image_id in ids], dtype=torch.float32)

    def targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: the class explained, the predicted class and the explained class's probability."""
        logits = model_output(self.model, x)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(
                f"model: the explain job needs a classifier with (N, classes) logits, got {shape}"
            )
        predicted = logits.argmax(dim=1)
        if self.target is not None and not 0 <= self.target < logits.shape[1]:
            raise ValueError(f"target: class {self.target} out of range [0, {logits.shape[1]})")
        target = predicted if self.target is None else torch.full_like(predicted, self.target)
        probability = logits.float().softmax(dim=1).gather(1, target[:, None])[:, 0]
        return target, predicted, probability

    def explain(
        self, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Raw maps of every method and its seconds per image; failing methods dropped if not strict."""
        maps, seconds = {}, {}
        for name, method in list(self.methods.items()):
            start = time.perf_counter()
            try:
                maps[name] = method(x, target=ClassLogit(target)).detach()
            except (ValueError, TypeError, RuntimeError) as err:
                if self.strict:
                    raise
                self.drop(name, f"{type(err).__name__}: {err}")
                continue
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            seconds[name] = (time.perf_counter() - start) / x.shape[0]
        return maps, seconds

    def score(
        self, x: torch.Tensor, heat: dict[str, torch.Tensor], target: torch.Tensor, masks: torch.Tensor | None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """This batch's metric values of each scored method, ``{method: {metric: (N,)}}``; the
        values also accumulate for :meth:`results`."""
        return self.run_metrics.score(x, heat, target, masks)

    def write_images(
        self, ids: Sequence[str], x: torch.Tensor, maps: dict[str, torch.Tensor], target: torch.Tensor
    ) -> None:
        """The input, each method's overlay and the raw maps, one set of files per image."""
        big = upscale(to_rgb(x.float()), self.png_size).cpu()
        for name, raw in maps.items():
            if self.methods[name].output == "image":
                pictures = upscale(to_rgb(minmax_normalize(raw.float().cpu())), self.png_size)
            else:
                pictures = overlay(big, raw.cpu(), cmap=self.cmap)
            for i, image_id in enumerate(ids):
                save_png(pictures[i], self.out / "overlays" / name / f"{image_id}.png")
        (self.out / "maps").mkdir(parents=True, exist_ok=True)
        for i, image_id in enumerate(ids):
            save_png(big[i], self.out / "images" / f"{image_id}.png")
            tensors = {name: raw[i].float().contiguous().cpu() for name, raw in maps.items()}
            save_file(
                tensors, str(self.out / "maps" / f"{image_id}.safetensors"), {"target": str(int(target[i]))}
            )

    def run_batch(
        self,
        ids: Sequence[str],
        x: torch.Tensor,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """Explain, score and write one batch; return its rows, one per image and method.

        The records and metric values also accumulate for :meth:`results`.
        """
        index = self._indices(ids)
        target, predicted, probability = self.targets(x)
        maps, seconds = self.explain(x, target)
        heat = {name: as_heatmap(raw) for name, raw in maps.items() if self.methods[name].output == "map"}
        values = self.score(x, heat, target, masks) if self.metrics and heat else {}
        self.write_images(ids, x, maps, target)
        n = x.shape[0]
        records = {
            "index": index,
            "process": torch.full((n,), float(world()[0])),
            "target": target,
            "predicted": predicted,
            "probability": probability,
            "label": torch.full((n,), math.nan) if labels is None else labels,
            "masked": torch.full((n,), float(masks is not None)),
        }
        self.run_metrics.record(records, seconds, x.device)
        return table_rows(ids, records, {name: torch.full((n,), seconds[name]) for name in maps}, values)

    def run(
        self,
        batches: Iterable[tuple[Sequence[str], torch.Tensor, Any]],
        *,
        total: int,
        device: torch.device,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Every batch of ``(ids, images, masks or None[, labels])``, with a progress bar; returns
        the merged rows of :meth:`results` (of every process's images).

        Under torch.distributed every process passes its own shard and this runs in rounds of one
        batch per process (a process out of batches takes part with none). After each round the
        processes exchange failures (:func:`gather_or_raise`): an error on one process is raised on
        every process, and a method dropped on one (``strict=False``) is dropped on all of them.
        """
        source = iter(batches)
        with tqdm(total=total, unit="img", desc="explain", disable=not progress) as bar:
            while True:
                error, active, before = None, False, set(self.skipped)
                try:
                    batch = next(source, None)
                    if batch is not None:
                        active = True
                        ids, x, masks, *labels = batch
                        masks = masks.to(device) if masks is not None else None
                        self.run_batch(ids, x.to(device), masks, labels[0] if labels else None)
                        bar.update(len(ids))
                except Exception as err:
                    error = err
                dropped = {name: self.skipped[name] for name in self.skipped if name not in before}
                reports = gather_or_raise(error, (active, dropped))
                for _, skipped in reversed(reports):  # the lowest rank's reason wins
                    for name, reason in skipped.items():
                        self.drop(name, reason)
                if not any(busy for busy, _ in reports):
                    break
        return self.results()

    def results(self) -> list[dict[str, Any]]:
        """One row per image and method of every process's images, in ``image_ids`` order.

        The records and metric values are merged by torchmetrics' sync, so under torch.distributed
        this is a collective: every process calls it (after :meth:`run`, which does) and gets all
        rows. Localisation values are included when every image came with a mask.
        """
        return self.run_metrics.results(self.image_ids)


# ----------------------------------------------------------------------------- the run


def _device(name: str, state: Any) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but no CUDA GPU is available (use --device cpu)")
    return state.device


def run_explain(cfg: ExplainConfig, *, progress: bool = True) -> Path:
    """Run the job described by ``cfg``; returns the run folder.

    Inputs are checked before any work (unknown method, missing or empty image folder, unknown
    model or layer: ValueError / FileNotFoundError with the reason). Under ``accelerate launch``
    each process explains its share of the images; the main process merges the metrics and
    writes the report.
    """
    from accelerate import PartialState

    names = resolve_methods(cfg.methods)
    method_options(cfg.options)  # a misspelt method option fails before any work
    if cfg.size is not None:
        check_positive_int(cfg.size, "size", minimum=8)
    colorize(torch.zeros(1, 1, 1, 1), cfg.cmap)  # an unknown colormap fails before any work
    check_positive_int(cfg.batch_size, "batch_size")
    paths = list_images(cfg.images)
    items = list(zip(image_ids(paths, Path(cfg.images).expanduser()), paths))
    state = PartialState(cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()))
    device = _device(cfg.device, state)
    model = load_model(cfg.model, cfg.weights, classes=cfg.classes).to(device).eval()
    size = input_size(model) if cfg.size is None else cfg.size
    layer = cfg.layer
    if any(issubclass(attribution.get(n), LayerAttribution) for n in names):
        layer = layer or default_layer(model)
        get_module(model, layer)
    strict = not any(n.lower() == "all" for n in cfg.methods)
    methods, skipped = build_methods(model, names, layer=layer, options=cfg.options, strict=strict)
    out = Path(cfg.out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        record = {
            **dataclasses.asdict(cfg),
            "size": size,
            "layer": layer,
            "methods": names,
            "processes": state.num_processes,
            "class_names": list(getattr(getattr(model, "config", None), "class_names", []) or []),
        }
        note = random_weights_note(cfg.model, cfg.weights)
        if note:
            record["notes"] = note
        (out / "config.json").write_text(json.dumps(record, indent=2))
    state.wait_for_everyone()

    explainer = Explainer(
        model,
        methods,
        out,
        target=cfg.target,
        metrics=cfg.metrics,
        curve_steps=cfg.curve_steps,
        cmap=cfg.cmap,
        png_size=cfg.png_size,
        strict=strict,
        skipped=skipped,
        image_ids=[image_id for image_id, _ in items],
    )
    with state.split_between_processes(items) as shard:
        batches = folder_batches(shard, size, cfg.batch_size, _channels(model))
        # every process gets every process's rows: the metrics merge by torchmetrics' sync
        rows = explainer.run(
            batches, total=len(shard), device=device, progress=progress and state.is_main_process
        )
    error = None
    if state.is_main_process:
        try:
            skipped = explainer.skipped
            write_metrics(out, rows, [n for n in names if n not in skipped], skipped)
            build_report(out, explain_sections(out))
        except Exception as err:
            error = err
    gather_or_raise(error)  # the others wait here, and fail too if writing failed
    return out


def _channels(model: nn.Module) -> int:
    """Input channels of the model's first convolution (3 when there is none)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


# ----------------------------------------------------------------------------- the report


def explain_sections(run_dir: str | Path, *, max_images: int = 24) -> list[Section]:
    """Report sections of an explanation run: overview, the image x method grid, metrics, config."""
    run_dir = Path(run_dir)
    metrics_file, config_file = run_dir / "metrics.json", run_dir / "config.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(
            f"run_dir: {run_dir} has no metrics.json; is it the folder of an explain run?"
        )
    metrics = json.loads(metrics_file.read_text())
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    methods = metrics["methods"]
    images = sorted({r["image"] for r in metrics["per_image"]})
    shown = images[:max_images]
    rows_by_image = {r["image"]: r for r in metrics["per_image"]}

    class_names = config.get("class_names") or []

    def class_name(index: int) -> str:
        return class_names[index] if 0 <= index < len(class_names) else f"class {index}"

    def label(image_id: str) -> str:
        row = rows_by_image[image_id]
        text = f"{image_id}\nexplained: {class_name(row['target'])} (p={row['probability']:.2f})"
        return text + (f"\ntrue: {class_name(row['label'])}" if "label" in row else "")

    overview = [config["notes"]] if config.get("notes") else []
    overview += [
        f"Model: {config.get('model', '?')}; layer of the layer methods: {config.get('layer') or '-'}.",
        f"{len(images)} images, {len(methods)} methods: {', '.join(methods)}."
        + (f" Showing the first {len(shown)} images." if len(shown) < len(images) else ""),
        "Maps are min-max scaled per image (several channels reduced by their largest magnitude).",
    ]
    for name, reason in metrics.get("skipped", {}).items():
        overview.append(f"Skipped {name}: {reason}")
    sections = [Section("Overview", text="\n".join(overview))]
    inputs = [run_dir / "images" / f"{i}.png" for i in images[:64]]
    if inputs and all(p.is_file() for p in inputs):
        path = real_images_figure(torch.stack([load_image(p) for p in inputs]), run_dir / "inputs.png")
        caption = f"the {len(inputs)} real images explained, as the model saw them" + (
            f" (first {len(inputs)} of {len(images)})" if len(inputs) < len(images) else ""
        )
        sections.append(Section("The images", images=[Picture(path.relative_to(run_dir), caption)]))
    cells = [[f"images/{i}.png", *[f"overlays/{m}/{i}.png" for m in methods]] for i in shown]
    images_only = [m for m in methods if _is_image_method(m)]
    bar = Colorbar(
        config.get("cmap", "jet"),
        "0 (least)",
        "1 (most)",
        f"{MINMAX}, blended over the input"
        + (f"; {', '.join(images_only)}: generated images, no map" if images_only else ""),
    )
    sections.append(
        Section(
            "Explanations",
            grid=Grid(columns=["input", *methods], rows=[label(i) for i in shown], cells=cells, colorbar=bar),
        )
    )
    if metrics["summary"]:
        better = metrics.get("better", {})
        records = [
            {(f"{k} ({'↓' if better[k] == 'lower' else '↑'})" if k in better else k): v for k, v in r.items()}
            for r in metrics["summary"]
        ]
        text = (
            "Means over images. Average Drop and Increase in Confidence (Grad-CAM++) score x * map; "
            "Win% is the share of images and other methods whose masked image keeps less of the score; "
            "deletion and insertion are the areas under RISE's curves; the pointing game and energy use "
            "the object masks. Arrows say which direction is better."
        )
        table = Table.from_records(records, notes={"ms_per_image": LOAD_NOTE})
        sections.append(Section("Metrics", text=text, table=table))
    if config:
        sections.append(Section("Run config", config=config))
    return sections


def _is_image_method(name: str) -> bool:
    """Whether the registered method ``name`` makes images, not maps (class model visualisation)."""
    try:
        return getattr(attribution.get(name), "output", "map") == "image"
    except ValueError:
        return False
