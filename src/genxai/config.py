"""Typed configs: dataclasses loaded from YAML, any value overridable as dotted ``key=value``.

    cfg = load_config(TrainConfig, "configs/demo.yaml", ["train.batch_size=64", "model.dropout=0.1"])
    save_config(cfg, run_dir / "config.yaml")

OmegaConf checks types and unknown keys against the dataclass, so a typo in a YAML file or an
override fails with the key's name instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def load_config(cls: type[T] | T, path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults (or a dataclass instance from its values), then the YAML
    file at ``path``, then dotted ``overrides``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls: expected a dataclass type or instance, got {cls!r}")
    base = OmegaConf.structured(cls)
    layers = [base]
    if path is not None:
        layers.append(OmegaConf.load(resolve_config_path(path)))
    bad = [item for item in overrides if "=" not in item]
    if bad:
        raise ValueError(f"overrides: expected dotted key=value items, got {bad}")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # one line: the key, then OmegaConf's first line
        key, first = getattr(err, "full_key", None), (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"config: {key}: {first}" if key else f"config: {first}") from None


SHIPPED = Path(__file__).parent / "configs"
"""Configs installed with the package (``demo``, ``cifar10``, ``celebahq256``)."""


def shipped_configs() -> list[str]:
    """Names of the configs that come with genxai."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file path, or the name of a shipped config (``"demo"`` -> its installed file)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = SHIPPED / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if path.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"config: no file at {path}; give a YAML path or one of the shipped configs: {', '.join(shipped_configs())}"
    )


def config_to_dict(cfg: Any) -> dict:
    """A plain dict of a config dataclass (for JSON logs and run folders)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path
