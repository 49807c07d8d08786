"""Checkpoints that survive a crash: safetensors for tensors, JSON for everything else.

A checkpoint is a folder ``ckpt-00001234`` (the iteration) holding ``NAME.safetensors`` weight files
and ``NAME.json`` + ``NAME.safetensors`` pairs for nested states (optimiser, RNG, counters). It is
written under a hidden temporary name, every file through a temporary file and ``os.replace``,
then the folder is renamed into place: a crash at any point leaves the previous checkpoints as they
were, and a half-written folder is never taken for a checkpoint. Nothing is unpickled on load.

    tmp = begin(root, 1234)
    write_weights(tmp, "unet", unet.state_dict())
    write_state(tmp, "trainer", {"step": 1234, "optim": optimizer.state_dict(), "rng": rng_state()})
    commit(tmp, keep=2)
    path = latest(root)  # -> root / "ckpt-00001234"
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save

M = TypeVar("M", bound=torch.nn.Module)
_NAME = re.compile(r"^ckpt-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def begin(root: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (invisible to :func:`latest`)."""
    tmp = Path(root) / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: str | Path, keep: int | None = None) -> Path:
    """Move a finished temporary folder into place atomically; keep only the newest ``keep``."""
    tmp = Path(tmp)
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    if keep is not None:
        for path in all_checkpoints(final.parent)[:-keep]:
            shutil.rmtree(path)
    return final


def all_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(root: str | Path) -> Path | None:
    """The newest finished checkpoint folder under ``root``, or None."""
    found = all_checkpoints(root)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"path: {path} is not a checkpoint folder (expected a name like ckpt-00001234)")
    return int(match.group(1))


def write_weights(
    folder: str | Path, name: str, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> Path:
    """``folder/NAME.safetensors`` from a flat tensor dict (a state_dict), written atomically.

    ``config``: the module's constructor arguments (JSON), kept in the file's metadata so the
    weights rebuild their module without the experiment config (:func:`read_config`).
    """
    metadata = {"config": json.dumps(config)} if config is not None else None
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return _atomic_write(Path(folder) / f"{name}.safetensors", data)


def read_config(folder: str | Path, name: str) -> dict[str, Any] | None:
    """The constructor config stored with ``NAME.safetensors`` by :func:`write_weights`, or None."""
    from safetensors import safe_open

    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {path.name} in {folder}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["config"]) if "config" in metadata else None


def read_weights(
    folder: str | Path, name: str, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {path.name} in {folder}")
    return load_file(path, device=str(device))


def load_module(folder: str | Path, name: str, cls: type[M], device: str | torch.device = "cpu") -> M:
    """``cls(**config)`` from the config stored with ``NAME.safetensors``, with its weights: a
    module that describes itself loads without the experiment that trained it."""
    config = read_config(folder, name)
    if config is None:
        raise ValueError(f"checkpoint: {Path(folder) / name}.safetensors holds no module config")
    module = cls(**config)
    module.load_state_dict(read_weights(folder, name))
    return module.to(device)


def write_state(folder: str | Path, name: str, tree: Any) -> Path:
    """A nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays) as
    ``NAME.json`` (structure) + ``NAME.safetensors`` (its tensors), each written atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    _atomic_write(Path(folder) / f"{name}.safetensors", save(tensors))
    return _atomic_write(Path(folder) / f"{name}.json", json.dumps(skeleton, indent=1).encode())


def read_state(folder: str | Path, name: str, device: str | torch.device = "cpu") -> Any:
    """The nested state written by :func:`write_state`, tensors on ``device``."""
    folder = Path(folder)
    if not (folder / f"{name}.json").is_file():
        raise FileNotFoundError(f"checkpoint: no {name}.json in {folder}")
    tensors = load_file(folder / f"{name}.safetensors", device=str(device))
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and Python's random."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state: cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].cpu().numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
