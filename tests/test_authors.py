"""Our networks, checkpoint loader and losses against numbers made by the authors' code (see tests/fixtures/README.md):
their network's outputs and their L^inf and L^r on fixed inputs, with weights given by a fixed rule in their layout.

    python -m pytest -q tests/test_authors.py
"""

import json
import math
import os

import pytest
import torch

import bfn_cifar
import bfn_mnist
import bfn_text8
import common
from conftest import ROOT, cpu_context

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def fixture(name):
    return torch.load(os.path.join(FIXTURES, name), weights_only=True)


def fill(shapes, seed):
    """The fixtures' weights: tensor i (in their order) drawn from torch's CPU generator seeded with seed + i;
    matrices and kernels uniform in +-1/sqrt(fan-in), norm weights 1 + U(-0.1, 0.1), biases U(-0.1, 0.1)."""
    state = {}
    for i, (name, shape) in enumerate(shapes):
        u = 2 * torch.rand(shape, generator=torch.Generator().manual_seed(seed + i), dtype=torch.float64) - 1
        if len(shape) > 1:
            w = u / math.sqrt(math.prod(shape[1:]))
        elif name.endswith("weight"):
            w = 1 + 0.1 * u
        else:
            w = 0.1 * u
        state[name] = w.float()
    return state


def authors_checkpoint(fx, path):
    """The fixture's weights saved as the authors save a model: one flat state_dict of their BFN module."""
    state = fill(fx["params"], fx["seed"])
    state.update({name: torch.zeros(shape) for name, shape in fx["buffers"]})
    torch.save(state, path)
    return str(path)


def close(ours, theirs, rel=1e-5):
    torch.testing.assert_close(ours, theirs, rtol=rel, atol=rel * theirs.abs().max().item())


def test_mnist_network_and_losses_are_the_authors(tmp_path):
    fx = fixture("authors_mnist.pt")
    net = bfn_mnist.UNet(32, (1, 2, 2), 1).eval()
    state = torch.load(authors_checkpoint(fx, tmp_path / "a.pt"), weights_only=True)
    net.load_state_dict(bfn_mnist.from_authors(state))
    theta = torch.stack([fx["theta0"], 1 - fx["theta0"]], -1)  # (B, 28, 28, 2)
    x, t, off = fx["data"].long(), fx["t"], cpu_context()
    with torch.no_grad():
        close(net(2 * fx["theta0"] - 1, t), fx["logits"])
        log_p = bfn_mnist.output_log_probs(net, theta, t, off)
        close(common.discrete_loss_inf(x, log_p.exp(), t, 9.0), fx["loss_inf"])
        log_p = bfn_mnist.output_log_probs(net, theta, torch.ones_like(t), off)
        close(common.discrete_recon_loss(x, log_p), fx["loss_r"])


def test_mnist_authors_checkpoint_through_init_from(mnist_dir, tmp_path):
    fx = fixture("authors_mnist.pt")
    path, out = authors_checkpoint(fx, tmp_path / "mnist_ema.pt"), str(tmp_path / "run")
    flags = [
        "--data-dir",
        mnist_dir,
        "--out-dir",
        out,
        "--init-from",
        path,
        "--eval-examples",
        "8",
        "--batch-size",
        "8",
        "--eval-n",
        "inf",
        "4",
        "--sample-steps",
        "2",
        "--num-samples",
        "4",
    ]
    bfn_mnist.main([*flags, *fx["flags"], "--eval-only"])
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert all(math.isfinite(ev["n"][n]["total"]) for n in ["inf", "4"])
    bfn_mnist.main([*flags, *fx["flags"], "--sample-only"])
    assert os.path.exists(os.path.join(out, "samples.png"))
    with pytest.raises(
        SystemExit,
        match=r"mnist_ema.pt does not fit this network \(size mismatch.*\); give its --digits.*--channels",
    ):
        bfn_mnist.main([*flags, "--channels", "64", "--res-blocks", "1", "--eval-only"])


def test_text8_network_and_losses_are_the_authors(tmp_path):
    fx = fixture("authors_text8.pt")
    net = bfn_text8.Transformer(16, 2, 2, 32).eval()
    state = torch.load(authors_checkpoint(fx, tmp_path / "a.pt"), weights_only=True)
    net.load_state_dict(bfn_text8.from_authors(state))
    x, t, theta, off = fx["data"], fx["t"], fx["theta"], cpu_context()
    with torch.no_grad():
        close(net(2 * theta - 1, t), fx["logits"])
        log_p = bfn_text8.output_log_probs(net, theta, t, off)
        close(common.discrete_loss_inf(x, log_p.exp(), t, 0.75**2), fx["loss_inf"])
        log_p = bfn_text8.output_log_probs(net, theta, torch.ones_like(t), off)
        close(common.discrete_recon_loss(x, log_p), fx["loss_r"])


def test_text8_authors_checkpoint_through_init_from(tmp_path):
    fx = fixture("authors_text8.pt")
    path, out, text = authors_checkpoint(fx, tmp_path / "text8_ema.pt"), str(tmp_path / "run"), tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 200)
    flags = [
        "--text-file",
        str(text),
        "--out-dir",
        out,
        "--init-from",
        path,
        "--eval-examples",
        "4",
        "--batch-size",
        "4",
        "--eval-n",
        "inf",
        "4",
        "--sample-steps",
        "2",
        "--num-samples",
        "2",
    ]
    bfn_text8.main([*flags, *fx["flags"], "--eval-only"])
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert all(math.isfinite(ev["n"][n]["total"]) for n in ["inf", "4"])
    bfn_text8.main([*flags, *fx["flags"], "--sample-only"])
    assert os.path.getsize(os.path.join(out, "samples.txt")) > 0
    with pytest.raises(
        SystemExit,
        match=r"text8_ema.pt does not fit this network \(size mismatch.*\); give its .*--width",
    ):
        bfn_text8.main([*flags, "--layers", "2", "--heads", "2", "--width", "64", "--seq-len", "16", "--eval-only"])


@pytest.mark.parametrize("output", ["discretised", "continuous"])
def test_cifar_network_and_losses_are_the_authors(output, tmp_path):
    fx = fixture(f"authors_cifar_{output}.pt")
    cfg = bfn_cifar.prepare(fx["flags"])[0]
    net = bfn_cifar.UNet(64, 2, n_out=2 if output == "discretised" else 1).eval()
    state = torch.load(authors_checkpoint(fx, tmp_path / "a.pt"), weights_only=True)
    net.load_state_dict(bfn_cifar.from_authors(state))
    x, t, off = fx["x"], fx["t"], cpu_context()
    assert fx["exact"].all()  # their -ln p is exact (not their tail approximation) on every pixel of the fixture
    with torch.no_grad():
        close(net(fx["mu"], t), fx["out"])
        close(bfn_cifar.loss_inf(x, bfn_cifar.output(net, fx["mu"], t, cfg, off), t, cfg), fx["loss_inf"])
        out = bfn_cifar.output(net, fx["mu1"], torch.ones_like(t), cfg, off)
        close(bfn_cifar.recon_loss(x, out, cfg), fx["nll"].sum((1, 2, 3)))


def test_cifar_authors_checkpoint_through_init_from(cifar_dir, tmp_path):
    fx = fixture("authors_cifar_discretised.pt")
    path, out = authors_checkpoint(fx, tmp_path / "cifar10_256d_ema.pt"), str(tmp_path / "run")
    flags = [
        "--data-dir",
        cifar_dir,
        "--out-dir",
        out,
        "--init-from",
        path,
        "--eval-examples",
        "4",
        "--batch-size",
        "4",
        "--eval-n",
        "inf",
        "4",
        "--sample-steps",
        "2",
        "--num-samples",
        "4",
    ]
    bfn_cifar.main([*flags, *fx["flags"], "--eval-only"])
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert all(math.isfinite(ev["n"][n]["total"]) for n in ["inf", "4"])
    bfn_cifar.main([*flags, *fx["flags"], "--sample-only"])
    assert os.path.exists(os.path.join(out, "samples.png"))
    with pytest.raises(
        SystemExit,
        match=r"cifar10_256d_ema.pt does not fit this network \(size mismatch.*\); give its .*--output",
    ):
        bfn_cifar.main([*flags, "--output", "continuous", "--channels", "64", "--res-blocks", "2", "--eval-only"])
