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
from conftest import ROOT

TINY = [
    "--channels",
    "8",
    "--res-blocks",
    "1",
    "--batch-size",
    "4",
    "--eval-examples",
    "6",
    "--eval-n",
    "inf",
    "3",
    "--sample-steps",
    "3",
    "--num-samples",
    "4",
    "--log-every",
    "1",
]


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
    run(cifar_dir, out, "--steps", "1", "--lr", "1e-12", "--bins", "16", "--eval-n", "inf", "--eval-examples", "20")
    total = json.load(open(os.path.join(out, "eval.json")))["n"]["inf"]["total"]
    assert 3.5 < total < 4.5  # measured: 4.20 ± 0.14 on these 20 images; nats or per-image units would fail


def test_data_quantisation(cifar_dir):
    cfg = bfn_cifar.prepare(["--data-dir", cifar_dir])[0]
    data = bfn_cifar.load_data(cfg, torch.device("cpu"))
    assert data["train"].shape == (99, 3, 32, 32) and data["val"].shape == (1, 3, 32, 32)
    assert data["test"].shape == (20, 3, 32, 32) and data["train"].dtype == torch.uint8
    v = torch.arange(256, dtype=torch.uint8)
    torch.testing.assert_close(bfn_cifar.as_data(v, cfg), (2 * v.float() + 1) / 256 - 1)
    assert torch.equal(bfn_cifar.as_data(v, dataclasses.replace(cfg, bins=16)), bin_centres(16)[v.long() // 16])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bins", "7"], "argument --bins: invalid choice: 7 (choose from 256, 16)"),
        (["--output", "gaussian"], "argument --output: invalid choice: 'gaussian'"),
        (["--sigma-1", "2"], "--sigma-1 must be less than 1, got 2.0"),
        (["--sigma-1", "0"], "--sigma-1 must be more than 0, got 0.0"),
        (["--channels", "12"], "--channels must be a multiple of 8, got 12"),
        (["--channels", "0"], "--channels must be at least 8, got 0"),
        (["--conditional", "--channels", "32"], "--conditional needs more --channels than the 32 GroupNorm groups"),
    ],
)
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bfn_cifar.prepare(argv)
    assert message in str(e.value.code) + capsys.readouterr().err


def test_corrupt_batch_fails_clearly(cifar_dir, tmp_path):
    path = os.path.join(cifar_dir, "cifar-10-batches-py", "data_batch_3")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 3])
    with pytest.raises(SystemExit, match="data_batch_3 is corrupt"):
        run(cifar_dir, str(tmp_path / "run"), "--steps", "1")


def test_torchrun_two_cpu_processes(cifar_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "bfn_cifar.py"),
        "--data-dir",
        cifar_dir,
        "--out-dir",
        out,
        *TINY,
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "cpu x 2" in log and "step 2 | loss" in log


@pytest.mark.parametrize("output", ["continuous", "discretised"])
def test_conditional_training_and_sampling(cifar_dir, tmp_path, output):
    """--conditional: the label embedding in the checkpoint (10 classes and the null label), a row of samples per class
    with their classes, with every sampler."""
    out = str(tmp_path / "run")
    run(cifar_dir, out, "--steps", "2", "--conditional", "--output", output, "--bins", "16", "--channels", "64")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["label_embed.weight"].shape == (11, 256)  # 10 classes and the null label, 4 x 64 channels
    for sampler in ("paper", "ode", "sde"):
        run(cifar_dir, out, "--sample-only", "--channels", "64", "--num-samples", "10", "--sampler", sampler)
        saved = torch.load(os.path.join(out, f"samples-{sampler}-3.pt"), weights_only=True)
        assert saved["labels"].tolist() == list(range(10)) and saved["samples"].shape == (10, 3, 32, 32)
