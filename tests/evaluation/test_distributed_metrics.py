"""The metrics under torch.distributed: two gloo processes each update their share of the images
(uneven, and in a second round one share is empty); ``compute()`` on both gives the same merged
result, equal to one process's, by torchmetrics' own sync."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genxai.evaluation import (
    AverageDrop,
    Deletion,
    IncreaseInConfidence,
    Insertion,
    LocalizationEnergy,
    PointingGame,
    WinPercent,
)
from tests.conftest import Discriminator

# which images each of the two processes sees, batch by batch
SHARES = {
    "uneven": ([[0], [1, 2]], [[3, 4]]),
    "one_empty": ([[0, 1, 2, 3, 4]], []),
}


def _data() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Discriminator().eval()  # single logit: the scores go through a sigmoid
    torch.manual_seed(3)
    x = torch.rand(5, 3, 16, 16)
    maps, other = torch.rand(5, 1, 16, 16), torch.rand(5, 1, 16, 16)
    masks = torch.zeros(5, 1, 16, 16, dtype=torch.bool)
    masks[:, :, 4:10, 2:12] = True
    return model, {"x": x, "maps": maps, "other": other, "masks": masks}


def _metrics(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {
        "average_drop": AverageDrop(model),
        "increase": IncreaseInConfidence(model),
        "win": WinPercent(model),
        "deletion": Deletion(model, steps=4),
        "insertion": Insertion(model, steps=4),
        "pointing": PointingGame(tolerance=2.0),
        "energy": LocalizationEnergy(threshold=0.3),
    }


def _run(batches: list[list[int]]) -> dict[str, dict[str, torch.Tensor]]:
    """Update every metric with ``batches`` of image indices, then compute (syncing if distributed)."""
    model, data = _data()
    metrics = _metrics(model)
    for batch in batches:
        x, maps, other, masks = (data[k][batch] for k in ("x", "maps", "other", "masks"))
        for name, metric in metrics.items():
            if name == "win":
                metric.update(x, maps, other)
            elif name in ("pointing", "energy"):
                metric.update(maps, masks)
            else:
                metric.update(x, maps)
    results = {}
    for name, metric in metrics.items():
        result = metric.compute()
        results[name] = {"per_image": result.per_image, "mean": torch.tensor(result.mean)}
        if hasattr(result, "curves"):
            results[name]["curves"] = result.curves
    return results


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save({case: _run(shares[rank]) for case, shares in SHARES.items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_processes_compute_the_merged_metrics(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    alone = _run([[0, 1, 2, 3, 4]])
    assert alone["average_drop"]["per_image"].shape == (5,)
    for rank in (0, 1):
        merged = torch.load(tmp_path / f"rank{rank}.pt")
        for case in SHARES:
            for name, values in alone.items():
                for key, expected in values.items():
                    got = merged[case][name][key]
                    assert got.shape == expected.shape, (rank, case, name, key)
                    assert torch.allclose(got, expected, atol=1e-6), (rank, case, name, key)
