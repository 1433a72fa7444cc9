"""bfn_cifar.py end to end on tiny synthetic CIFAR-10 pickles: both output types at 256 and 16 bins, errors, torchrun.

    python -m pytest -q tests/test_cifar.py
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bfn_cifar
from common import bin_centres
from conftest import ROOT, cpu_context

TINY = ["--channels", "8", "--res-blocks", "1", "--batch-size", "4", "--eval-examples", "6", "--eval-n", "inf", "3",
        "--sample-steps", "3", "--num-samples", "4", "--log-every", "1"]


def run(data, out, *extra):
    bfn_cifar.main(["--data-dir", data, "--out-dir", out, *TINY, *extra])


@pytest.mark.parametrize("output", ["continuous", "discretised"])
@pytest.mark.parametrize("bins", ["256", "16"])
def test_three_steps_end_to_end(cifar_dir, tmp_path, output, bins):
    out = str(tmp_path / "run")
    run(cifar_dir, out, "--steps", "3", "--output", output, "--bins", bins)
    for name in ["ckpt.pt", "log.txt", "eval.json", "samples.png", "evolution.png", "evolution.gif"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["step"] == 3 and ev["unit"] == "bits/dim" and ev["examples"] == 6
    for r in ev["n"].values():
        assert all(math.isfinite(r[k]) for k in ["loss", "recon", "total", "stderr"])
    cfg = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    assert cfg["sigma_1"] == pytest.approx(0.001 if bins == "256" else math.sqrt(0.001))
    os.remove(os.path.join(out, "samples.png"))
    run(cifar_dir, out, "--sample-only", "--sampler", "ode", "--output", output, "--bins", bins)
    assert os.path.exists(os.path.join(out, "samples.png"))
    saved = torch.load(os.path.join(out, "samples-ode-3.pt"), weights_only=True)["samples"]
    assert saved.shape == (4, 3, 32, 32) and saved.abs().max() <= 1
    if output == "discretised":  # bin centres
        torch.testing.assert_close(saved, bin_centres(int(bins))[((saved + 1) * int(bins) / 2).long()])


def test_untrained_discretised_model_is_near_uniform(cifar_dir, tmp_path):
    """The zero-initialised network predicts mu_x = mu / gamma, sigma_x = sqrt((1 - gamma) / gamma): a sanity check that
    the bits/dim are in the right units (a uniform model over 16 bins scores 4 bits/dim)."""
    out = str(tmp_path / "run")
    run(cifar_dir, out, "--steps", "0", "--bins", "16", "--eval-n", "inf", "--eval-examples", "20")
    total = json.load(open(os.path.join(out, "eval.json")))["n"]["inf"]["total"]
    assert 3.5 < total < 4.5  # measured: 4.20 ± 0.14 on these 20 images; nats or per-image units would fail


def test_data_quantisation(cifar_dir):
    cfg = bfn_cifar.parse_args(["--data-dir", cifar_dir])
    data = bfn_cifar.load_data(cfg, torch.device("cpu"))
    assert data["train"].shape == (99, 3, 32, 32) and data["val"].shape == (1, 3, 32, 32)
    assert data["test"].shape == (20, 3, 32, 32) and data["train"].dtype == torch.uint8
    v = torch.arange(256, dtype=torch.uint8)
    torch.testing.assert_close(bfn_cifar.quantise(v, 256), (2 * v.float() + 1) / 256 - 1)
    assert torch.equal(bfn_cifar.quantise(v, 16), bin_centres(16)[v.long() // 16])



@pytest.mark.parametrize("argv,message", [
    (["--bins", "7"], "argument --bins: invalid choice: 7 (choose from 256, 16)"),
    (["--output", "gaussian"], "argument --output: invalid choice: 'gaussian'"),
    (["--sigma-1", "2"], "--sigma-1 must be in (0, 1)"),
    (["--channels", "12"], "--channels must be a multiple of 8 and --res-blocks at least 1, got 12 and 32"),
    (["--sample-class", "3"], "--sample-class needs a --conditional model or --grad-guidance"),
    (["--conditional", "--sample-class", "cat"], "--sample-class takes all or classes 0..9, got cat"),
    (["--conditional", "--channels", "32"], "--conditional needs more channels than the 32 GroupNorm groups"),
])
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bfn_cifar.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_corrupt_batch_fails_clearly(cifar_dir, tmp_path):
    path = os.path.join(cifar_dir, "cifar-10-batches-py", "data_batch_3")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 3])
    with pytest.raises(SystemExit, match="data_batch_3 is corrupt"):
        run(cifar_dir, str(tmp_path / "run"), "--steps", "1")


def test_torchrun_two_cpu_processes(cifar_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "bfn_cifar.py"),
           "--data-dir", cifar_dir, "--out-dir", out, *TINY, "--steps", "2", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "cpu x 2" in log and "step 2 | loss" in log


@pytest.mark.parametrize("output", ["continuous", "discretised"])
def test_inpainting_keeps_the_known_pixels(output):
    one = bfn_cifar.parse_args(["--channels", "8", "--res-blocks", "1", "--output", output, "--bins", "16",
                                "--sample-steps", "3", "--inpaint", "left", "--sampler", "ode"])
    net = bfn_cifar.UNet(8, 1, 0.0, n_out=1 if output == "continuous" else 2).eval()
    original = bfn_cifar.quantise(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), 16)
    missing = bfn_cifar.inpaint_mask(one, 32, torch.device("cpu"))
    x = bfn_cifar.draw(net, 2, one, cpu_context(), torch.Generator().manual_seed(0),
                       known=torch.where(missing, float("nan"), original))
    torch.testing.assert_close(x[..., 16:], original[..., 16:])


@pytest.mark.parametrize("output", ["continuous", "discretised"])
def test_guidance_combines_the_predictions(output):
    """A stand-in network whose outputs are the label: with guidance w, (1 + w) x_hat(y) - w x_hat(null) (continuous)
    or (1 + w) p_O(. | y) - w p_O(. | null) (discretised: its mean bin is the guided mean bin), from one call on both
    batches; without guidance, the class's own prediction."""
    calls = []

    def net(mu, t, y):
        calls.append(len(mu))
        return y.float()[:, None, None, None, None].expand(len(mu), 2 if output == "discretised" else 1, 3, 32, 32) / 20

    cfg = dataclasses.replace(bfn_cifar.parse_args(["--conditional", "--output", output, "--bins", "16"]), guidance=2.0,
                              sampler="ode")
    mu, t, y = torch.zeros(2, 3, 32, 32), torch.full((2,), 0.5), torch.tensor([4, 4])
    guided = bfn_cifar.guided_output(net, mu, t, y, cfg, cpu_context())
    assert calls == [4]
    pred = lambda label: bfn_cifar.guided_output(net, mu, t, torch.tensor([label, label]),  # noqa: E731
                                                 dataclasses.replace(cfg, guidance=0.0), cpu_context())
    expected = 3 * pred(4) - 2 * pred(10)  # (1 + w) for the class, w for the null label
    torch.testing.assert_close(guided, expected.clamp(-1, 1) if output == "continuous" else expected)
    if output == "discretised":  # the guided mean bin is the guided combination of the two mean bins
        centres = bin_centres(16)
        torch.testing.assert_close((guided * centres).sum(-1), 3 * (pred(4) * centres).sum(-1) - 2 * (pred(10) *
                                                                                                     centres).sum(-1))


@pytest.mark.parametrize("output", ["continuous", "discretised"])
def test_conditional_training_and_guided_sampling(cifar_dir, tmp_path, output):
    out = str(tmp_path / "run")
    run(cifar_dir, out, "--steps", "2", "--conditional", "--output", output, "--bins", "16", "--channels", "64")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["label_embed.weight"].shape == (11, 256)  # 10 classes and the null label, 4 x 64 channels
    for sampler in ("paper", "ode", "sde"):
        run(cifar_dir, out, "--sample-only", "--channels", "64", "--sample-class", "3", "--guidance", "3", "--sampler",
            sampler)
        saved = torch.load(os.path.join(out, f"samples-{sampler}-3-g3.pt"), weights_only=True)
        assert saved["labels"].eq(3).all() and saved["samples"].shape == (4, 3, 32, 32)


@pytest.mark.parametrize("output", ["continuous", "discretised"])
def test_gradient_guidance_and_particles_end_to_end(cifar_dir, tmp_path, output):
    """--grad-guidance towards a class through the classifier of mu with every sampler, and inpainting by sequential
    Monte Carlo with the stochastic samplers, on an unconditional model."""
    out = str(tmp_path / "run")
    run(cifar_dir, out, "--steps", "1", "--output", output, "--bins", "16")
    for sampler in ("paper", "ode", "sde"):
        run(cifar_dir, out, "--sample-only", "--grad-guidance", "1", "--sample-class", "7", "--sampler", sampler)
        assert os.path.exists(os.path.join(out, f"samples-{sampler}-3-gg1.pt"))
    for sampler in ("paper", "sde"):
        run(cifar_dir, out, "--sample-only", "--inpaint", "left", "--particles", "2", "--sampler", sampler)
        x = torch.load(os.path.join(out, f"inpaint-left-{sampler}-3-p2.pt"), weights_only=True)["samples"]
        original = bfn_cifar.quantise(bfn_cifar.load_cifar(cifar_dir)["test"][0][:4], 16)
        torch.testing.assert_close(x[..., 16:], original[..., 16:])  # the right half was given
    assert "inpainting (left, sde, 3 steps, 2 particles, " in open(os.path.join(out, "log.txt")).read()
