"""benchmarks/another_network.py: a BFN on a transformer through common.py alone. It trains on tiny data in the real
formats, its test bound is the scripts' evaluation of the same network function to float rounding, and its sampler
gives samples of the right shape and values.

    python -m pytest -q tests/test_another_network.py
"""

import json
import os
import sys

import pytest
import torch

import bfn_cifar
import bfn_mnist
from conftest import ROOT, cpu_context, write_cifar, write_mnist

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import another_network as A


def test_sized_to_the_quick_u_nets():
    """Within 10% of the parameters of the scripts' quick U-Nets."""
    for kind, module in (("mnist", bfn_mnist), ("cifar", bfn_cifar)):
        cfg = module.prepare(
            ["--preset", "quick", "--output", "discretised"] if kind == "cifar" else ["--preset", "quick"]
        )[0]
        u_net = sum(p.numel() for p in module.make_network(cfg).parameters())
        transformer = sum(p.numel() for p in A.make_network(kind).parameters())
        assert abs(transformer / u_net - 1) < 0.1, (kind, transformer, u_net)


@pytest.mark.parametrize("kind", ["mnist", "cifar"])
def test_its_bound_is_the_scripts_evaluation_of_the_same_network(kind, tmp_path):
    """The same common.py calls, in the same order of random draws, give the script's number: the script's network
    function is the transformer behind the script's own input and output conventions."""
    torch.manual_seed(0)
    net = A.make_network(kind).eval()
    with torch.no_grad():
        for p in net.parameters():  # random weights, so that the output is not the zero-initialised one
            p.add_(0.05 * torch.randn_like(p))
    if kind == "mnist":
        data_dir = write_mnist(str(tmp_path / "data"))
        module = bfn_mnist

        def script_net(x, t, labels):  # x = 2 theta_0 - 1 -> the logit of black, from the transformer's two logits
            logits = net(-x[:, None], t)  # 2 theta_1 - 1 = -(2 theta_0 - 1)
            return logits[:, 1] - logits[:, 0]

    else:
        data_dir = write_cifar(str(tmp_path / "data"))
        module = bfn_cifar

        def script_net(mu, t, labels):  # (B, 3, H, W) -> (B, 2, 3, H, W): (mu_eps, ln sigma_eps)
            return net(mu, t).unflatten(1, (2, 3))

    flags = ["--data-dir", data_dir, "--out-dir", str(tmp_path / "run"), "--eval-n", "inf", "--batch-size", "8"]
    cfg = module.prepare(flags + (["--bins", "256"] if kind == "cifar" else []))[0]
    data = module.load_data(cfg, torch.device("cpu"))
    os.makedirs(cfg.out_dir)  # where evaluate() writes eval.json
    theirs = module.evaluate(script_net, cfg, cpu_context(), data, 0)["n"]["inf"]
    ours = A.bound(net, kind, A.load_images(kind, data_dir)["test"], 8)
    assert ours["total"] == pytest.approx(theirs["total"], rel=1e-5) and ours["stderr"] == pytest.approx(
        theirs["stderr"], rel=1e-4
    )


@pytest.mark.parametrize("kind", ["mnist", "cifar"])
def test_it_trains_and_samples(kind, tmp_path):
    data_dir = write_mnist(str(tmp_path / "data")) if kind == "mnist" else write_cifar(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    result = A.main([kind, "--data-dir", data_dir, "--minutes", "0.02", "--num-samples", "3", "--out-dir", out])
    saved = json.load(open(os.path.join(out, f"{kind}-transformer-s0.json")))
    assert saved["steps"] == result["steps"] > 0 and saved["test"]["total"] > 0 and len(saved["curve"]) == 1
    for calls in (10, 100):
        x = torch.load(os.path.join(out, f"{kind}-transformer-s0-{calls}-calls.pt"), weights_only=True)["samples"]
        if kind == "mnist":
            assert x.shape == (3, 28, 28) and x.dtype == torch.uint8 and set(x.unique().tolist()) <= {0, 1}
        else:
            centres = bfn_cifar.common.bin_centres(256)
            assert x.shape == (3, 3, 32, 32) and torch.equal(x, centres[((x + 1) * 128).long().clamp(0, 255)])
