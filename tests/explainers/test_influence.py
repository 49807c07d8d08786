"""Influence functions against leave-one-out retraining; LiSSA against the exact Hessian; TracIn by
hand, against Captum's TracInCP on the loop's checkpoints, and its one-checkpoint error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genxai.explainers.influence import (
    ClassifierRunConfig,
    ClassifierStep,
    FlatModel,
    InfluenceFunction,
    top_examples,
    tracin,
)

L2 = 0.05


def _data(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    y = ((x @ w + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).long()
    return x, y


def _fit(x, y, weights, init=None):
    """Logistic regression (2 logits) minimising sum_i weights_i CE_i / n + L2/2 ||theta||^2, solved
    to machine precision by Newton's method with the closed-form gradient and Hessian."""
    n, d = x.shape[0], x.shape[1] + 1
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    onehot = F.one_hot(y, 2).double()
    w = torch.zeros(2, d, dtype=torch.float64)
    for _ in range(12):
        p = torch.softmax(xb @ w.T, 1)
        g = torch.einsum("i,ik,ij->kj", weights, p - onehot, xb) / n + L2 * w
        a = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        h = torch.einsum("i,ikl,ij,im->kjlm", weights, a, xb, xb).reshape(2 * d, 2 * d) / n
        w = w - torch.linalg.solve(h + L2 * torch.eye(2 * d, dtype=torch.float64), g.flatten()).view(2, d)
    model = nn.Linear(d - 1, 2).double()
    with torch.no_grad():
        model.weight.copy_(w[:, :-1])
        model.bias.copy_(w[:, -1])
    return model


def _retrained_change(model, x, y, xt, yt, index, removed):
    """Change of each test loss when image ``index`` loses weight ``removed`` and we retrain."""
    base = F.cross_entropy(model(xt), yt, reduction="none").detach()
    weights = torch.ones(len(x), dtype=torch.float64)
    weights[index] = 1 - removed
    again = _fit(x, y, weights, init=model.state_dict())
    return F.cross_entropy(again(xt), yt, reduction="none").detach() - base


def test_exact_influence_equals_leave_one_out_retraining():
    """Koh & Liang on L2-regularised logistic regression: the score predicts the LOO change of the
    test loss (first order: close, and exact in the limit of a small removed weight)."""
    x, y = _data(100)
    xt, yt = _data(6, seed=1)
    model = _fit(x, y, torch.ones(len(x), dtype=torch.float64))
    scores = InfluenceFunction(model, x, y, l2=L2, method="exact").scores(xt, yt)
    picked = scores.abs().amax(0).argsort(descending=True)[:12].tolist()  # the most influential
    loo = torch.stack([_retrained_change(model, x, y, xt, yt, i, 1.0) for i in picked], 1)
    s = scores[:, picked]
    assert (s - loo).abs().max() < 0.2 * loo.abs().max()
    assert torch.corrcoef(torch.stack([s.flatten(), loo.flatten()]))[0, 1] > 0.99
    eps = 1e-3  # the derivative the influence function is: remove a sliver of the image's weight
    small = torch.stack([_retrained_change(model, x, y, xt, yt, i, eps) / eps for i in picked], 1)
    assert (s - small).abs().max() < 1e-2 * small.abs().max()
    assert torch.equal(torch.sign(s), torch.sign(loo))  # who helped and who hurt: always right


def test_lissa_agrees_with_the_exact_inverse():
    x, y = _data()
    model = _fit(x, y, torch.ones(len(x), dtype=torch.float64))
    exact = InfluenceFunction(model, x, y, l2=L2, method="exact").scores(x[:4], y[:4])
    lissa = InfluenceFunction(model, x, y, l2=L2, method="lissa", lissa_depth=150, lissa_batch=len(x)).scores(
        x[:4], y[:4]
    )
    assert (lissa - exact).abs().max() < 0.02 * exact.abs().max()


def test_per_sample_grads_equal_a_loop_of_backward_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x, y = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 1, 0])
    flat = FlatModel(model)
    got = flat.per_sample_grads(flat.vector(), x, y)
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        want = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.allclose(got[i], want, atol=1e-6)
    with pytest.raises(ValueError, match=r"params: no parameters named \['nope'\]"):
        FlatModel(model, ["nope"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SmallResNet trained on the one training loop, a checkpoint every 3 steps, all kept."""
    from genxai.data import get_dataset
    from genxai.training import Loop, LoopConfig

    root = tmp_path_factory.mktemp("cls")
    data = get_dataset("shapes", size=8, n=48, seed=0)
    cfg = ClassifierRunConfig(
        classes=len(data.classes), channels=3, image_size=8, width=4, lr=0.1, iterations=6
    )
    loop_cfg = LoopConfig(
        run_dir=root,
        batch_size=16,
        checkpoint_every=3,
        keep_checkpoints=10,
        progress=False,
        cpu=True,
        log_every=3,
    )
    loop = Loop(ClassifierStep(cfg), loop_cfg, data)
    loop.fit()
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    return root, loop.unwrap("classifier"), x, y


def test_tracin_by_hand_and_against_captum(run):
    from genxai.training import checkpoint as ckpt

    root, model, x, y = run
    paths = ckpt.all_checkpoints(root / "checkpoints")
    assert len(paths) == 2
    train, test = (x[:20], y[:20]), (x[40:44], y[40:44])
    ours = tracin(model, root, *train, *test, batch_size=7)
    # by hand: sum over checkpoints of lr * <grad test, grad train>, one backward per image
    net = type(model)(model.config).eval()
    want = torch.zeros_like(ours)
    for path in paths:
        net.load_state_dict(ckpt.read_weights(path, "classifier"))

        def g(xi, yi):
            net.zero_grad()
            F.cross_entropy(net(xi[None]), yi[None]).backward()
            return torch.cat([p.grad.flatten() for p in net.parameters()])

        gt = torch.stack([g(a, b) for a, b in zip(*test)])
        gr = torch.stack([g(a, b) for a, b in zip(*train)])
        want += 0.1 * gt @ gr.T
    assert torch.allclose(ours, want, rtol=1e-4, atol=1e-6)

    captum_influence = pytest.importorskip("captum.influence")

    def load(m, path):
        m.load_state_dict(ckpt.read_weights(path, "classifier"))
        m.eval()
        return 0.1

    peer = captum_influence.TracInCP(
        type(model)(model.config).eval(),
        torch.utils.data.TensorDataset(*train),
        checkpoints=[str(p) for p in paths],
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=8,
    )
    theirs = peer.influence(test)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    helped, hurt = top_examples(ours, 3)
    assert (ours.gather(1, helped[:, :1]) >= ours.max(1, keepdim=True).values).all()
    assert (ours.gather(1, hurt[:, :1]) <= ours.min(1, keepdim=True).values).all()


def test_tracin_with_one_checkpoint_is_a_clear_error(run):
    from genxai.training import checkpoint as ckpt

    root, model, x, y = run
    one = ckpt.all_checkpoints(root / "checkpoints")[-1:]
    with pytest.raises(ValueError, match=r"checkpoints: TracIn .* needs at least 2 checkpoints, got 1"):
        tracin(model, one, x[:4], y[:4], x[:2], y[:2])
    with pytest.raises(FileNotFoundError, match="checkpoints: no training-loop checkpoints"):
        tracin(model, root / "nothing", x[:4], y[:4], x[:2], y[:2])


@pytest.mark.peers
def test_benchmark_quick_runs(capsys):
    """benchmarks/explainers.py --quick: both rows run and our scores agree with Captum's."""
    pytest.importorskip("captum")
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("benchmark_explainers", root / "explainers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results = module.main(["--quick"])
    finally:
        sys.path.remove(str(root))
    assert results["agree"] and len(results["rows"]) == 2
    assert "| all parameters | captum |" in capsys.readouterr().out


def test_exact_hessian_refuses_a_large_model_and_bad_labels():
    big = nn.Linear(200, 101)
    x, y = torch.randn(4, 200), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="method: the exact Hessian of 20301 parameters is too large"):
        InfluenceFunction(big, x, y)
    assert InfluenceFunction(big, x, y, params=["bias"]).flat.size == 101
    with pytest.raises(ValueError, match="labels: expected one label per training image"):
        InfluenceFunction(big, x, y[:3], params=["bias"])
    with pytest.raises(ValueError, match="method: expected one of"):
        InfluenceFunction(big, x, y, method="arnoldi")


def test_normalized_tracin_is_the_sum_of_lr_times_gradient_cosines(run):
    root, model, x, y = run
    raw = tracin(model, root, x[:6], y[:6], x[40:42], y[40:42], params=["fc"])
    cos = tracin(model, root, x[:6], y[:6], x[40:42], y[40:42], params=["fc"], normalize=True)
    from genxai.training import checkpoint as ckpt

    net = type(model)(model.config).eval()
    want = torch.zeros_like(cos)
    for path in ckpt.all_checkpoints(root / "checkpoints"):
        net.load_state_dict(ckpt.read_weights(path, "classifier"))
        flat = FlatModel(net, ["fc"])
        gt = flat.per_sample_grads(flat.vector(), x[40:42], y[40:42])
        gr = flat.per_sample_grads(flat.vector(), x[:6], y[:6])
        want += 0.1 * F.cosine_similarity(gt[:, None], gr[None], dim=2)
    assert torch.allclose(cos, want, atol=1e-5)
    assert cos.abs().max() <= 2 * 0.1 + 1e-6 and not torch.allclose(raw, cos)
