"""bfn_mnist.py end to end on tiny synthetic MNIST files: outputs, two digits, errors, torchrun.

python -m pytest -q tests/test_mnist.py
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bfn_mnist
from conftest import ROOT, cpu_context

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
    bfn_mnist.main(["--data-dir", data, "--out-dir", out, *TINY, *extra])


def test_three_steps_end_to_end(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "3")
    for name in [
        "ckpt.pt",
        "log.txt",
        "eval.json",
        "samples.png",
        "samples-paper-3.pt",
        "evolution.png",
        "evolution.gif",
    ]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["step"] == 3 and ev["split"] == "test" and ev["unit"] == "nats/image" and ev["examples"] == 6
    for n in ["inf", "3"]:
        r = ev["n"][n]
        assert all(math.isfinite(r[k]) for k in ["loss", "recon", "total", "stderr"])
        assert r["total"] == pytest.approx(r["loss"] + r["recon"])
    from PIL import Image

    assert Image.open(os.path.join(out, "evolution.gif")).n_frames == 3 + 2  # each of the n + 1 steps, the samples
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 3 and set(ckpt) == {"model", "ema", "optimizer", "step", "config", "script"}
    log = open(os.path.join(out, "log.txt")).read()
    assert "step 3 | loss" in log and "examples/s" in log and "ETA" in log
    saved = torch.load(os.path.join(out, "samples-paper-3.pt"), weights_only=True)
    assert saved["samples"].shape == (4, 28, 28) and saved["labels"] is None and saved["script"] == "bfn_mnist.py"
    # --eval-only and --sample-only reuse the checkpoint
    os.remove(os.path.join(out, "samples.png"))
    run(mnist_dir, out, "--sample-only")
    assert os.path.exists(os.path.join(out, "samples.png"))
    os.remove(os.path.join(out, "samples.png"))
    run(mnist_dir, out, "--sample-only", "--sampler", "ode")
    assert os.path.exists(os.path.join(out, "samples.png")) and os.path.exists(os.path.join(out, "samples-ode-3.pt"))
    run(mnist_dir, out, "--eval-only", "--eval-n", "inf", "2", "5", "--eval-repeats", "3")
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert set(ev["n"]) == {"inf", "2", "5"} and ev["repeats"] == 3 and ev["examples"] == 6


def test_a_confident_wrong_pixel_is_scored_at_its_true_cost():
    """A pixel predicted black with log-odds 30 but white in the data costs -ln sigmoid(-30) = 30.0 nats, not the
    87.3 of an underflowed float32 probability."""

    def net(x, t, labels):  # a logit of 30 for black everywhere
        return torch.full_like(x, 30.0)

    theta = torch.full((1, 28, 28, 2), 0.5)
    log_p = bfn_mnist.output_log_probs(net, theta, torch.ones(1), cpu_context())
    white = torch.zeros(1, 28, 28, dtype=torch.long)
    assert -log_p[0, 0, 0, 0].item() == pytest.approx(30.0, rel=1e-6)
    assert bfn_mnist.common.discrete_recon_loss(white, log_p).item() == pytest.approx(784 * 30.0, rel=1e-5)


def test_two_digits_are_64x64(mnist_dir, tmp_path):
    cfg = bfn_mnist.prepare(["--data-dir", mnist_dir, "--digits", "2"])[0]
    data = bfn_mnist.load_data(cfg, torch.device("cpu"))
    assert data["train"].shape == (59_400, 64, 64) and data["val"].shape == (600, 64, 64)
    assert data["test"].shape == (10_000, 64, 64) and data["train"].dtype == torch.uint8
    again = bfn_mnist.load_data(dataclasses.replace(cfg, conditional=True), torch.device("cpu"))
    assert torch.equal(data["test"], again["test"])  # deterministic given the seed, with or without labels
    assert again["test_labels"].shape == (10_000,) and again["test_labels"].max() <= 99
    assert torch.equal(data["test_labels"], again["test_labels"])  # labels are loaded with or without --conditional
    ink_left, ink_right = data["test"][:, :, :32].float().sum((1, 2)), data["test"][:, :, 32:].float().sum((1, 2))
    assert (ink_left > 0).all() and (ink_right > 0).all()  # a digit in each half
    x = bfn_mnist.as_data(data["test"][:8], cfg)
    assert set(x.unique().tolist()) <= {0, 1}
    out = str(tmp_path / "two")  # a conditional model of the numbers 00-99: a row per number
    run(
        mnist_dir,
        out,
        "--digits",
        "2",
        "--steps",
        "1",
        "--eval-examples",
        "2",
        "--num-samples",
        "100",
        "--conditional",
        "--channels",
        "32",
        "--batch-size",
        "100",
        "--sample-steps",
        "1",
    )
    saved = torch.load(os.path.join(out, "samples-paper-1.pt"), weights_only=True)
    assert saved["samples"].shape == (100, 64, 64) and saved["labels"].tolist() == list(range(100))
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["label_embed.weight"].shape[0] == 22  # tens and units: the digits 0-9 and null each
    from PIL import Image

    assert Image.open(os.path.join(out, "samples.png")).size == (66 + 2, 100 * 66 + 2)  # 100 rows of 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--digits", "3"], "argument --digits: invalid choice: 3 (choose from 1, 2)"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--steps", "-1"], "--steps must be at least 1, got -1"),
        (["--eval-n", "inf", "ten"], "--eval-n takes inf or positive integers, got inf ten"),
        (["--sampler", "ddpm"], "argument --sampler: invalid choice: 'ddpm' (choose from 'paper', 'ode', 'sde')"),
        (["--eval-repeats", "0"], "--eval-repeats must be at least 1, got 0"),
        (["--log-every", "0"], "--log-every must be at least 1, got 0"),
        (["--lr", "0"], "--lr must be more than 0, got 0.0"),
        (["--beta-1", "nan"], "--beta-1 must be more than 0, got nan"),
        (["--channels", "12"], "--channels must be a multiple of 8, got 12"),
        (["--res-blocks", "0"], "--res-blocks must be at least 1, got 0"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--conditional", "--channels", "16"], "--conditional needs more --channels"),
    ],
)
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bfn_mnist.prepare(argv)
    assert message in str(e.value.code) + capsys.readouterr().err


def test_corrupt_data_file_fails_clearly(mnist_dir, tmp_path):
    path = os.path.join(mnist_dir, "MNIST", "raw", "train-images-idx3-ubyte.gz")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])  # a truncated download
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        run(mnist_dir, str(tmp_path / "run"), "--steps", "1")


def test_missing_checkpoint_fails_clearly(mnist_dir, tmp_path):
    with pytest.raises(SystemExit, match="no readable checkpoint"):
        run(mnist_dir, str(tmp_path / "empty"), "--eval-only")


def test_non_finite_loss_stops_and_keeps_the_checkpoint(mnist_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "2")
    before = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    real_loss = bfn_mnist.train_loss
    monkeypatch.setattr(bfn_mnist, "train_loss", lambda *a: real_loss(*a) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss at step 3"):
        run(mnist_dir, out, "--steps", "4", "--resume")
    after = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert after["step"] == 2 and all(torch.equal(v, after["model"][k]) for k, v in before["model"].items())


def test_torchrun_two_cpu_processes(mnist_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "bfn_mnist.py"),
        "--data-dir",
        mnist_dir,
        "--out-dir",
        out,
        *TINY,
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "cpu x 2" in log and "step 2 | loss" in log
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2


def test_two_digit_labels_are_the_numbers_shown():
    """Digit image k is filled with the value k + 1 and labelled k mod 10: each half of each image shows its digit."""
    digits = (torch.arange(20, dtype=torch.uint8) + 1)[:, None, None].expand(20, 28, 28).contiguous()
    images, numbers = bfn_mnist.two_digit_images(digits, torch.arange(20, dtype=torch.uint8) % 10, 50, seed=3)
    left, right = images[:, :, :32].amax((1, 2)), images[:, :, 32:].amax((1, 2))  # the value each half shows
    assert torch.equal(numbers.long(), 10 * ((left.long() - 1) % 10) + (right.long() - 1) % 10)


def test_conditional_network_sees_its_labels():
    net = bfn_mnist.UNet(64, (1,), 1, 0.0, classes=10).eval()  # 64 channels: GroupNorm(32) keeps the embedding
    theta, t = torch.full((2, 28, 28, 2), 0.5), torch.full((2,), 0.5)
    with torch.no_grad():
        for p in net.parameters():  # random weights: the zero-initialised output layers hide the label at first
            p.normal_(0, 0.1)
        out = {y: bfn_mnist.output_log_probs(net, theta, t, cpu_context(), torch.tensor([y, y])) for y in (3, 7, 10)}
        null = bfn_mnist.output_log_probs(net, theta, t, cpu_context())
    assert not torch.allclose(out[3], out[7]) and torch.equal(out[10], null)  # no label: the null label
    assert "label_embed.weight" not in bfn_mnist.UNet(8, (1, 2, 2), 1, 0.0).state_dict()  # the authors' network
    rows = net.label_embed.weight
    assert rows.shape == (11, 256) and torch.equal(net.embed_label(torch.tensor([3, 10])), rows[[3, 10]])
    two = bfn_mnist.UNet(64, (1,), 1, 0.0, classes=100)  # 00-99: a vector for the tens plus one for the units
    rows, embed = two.label_embed.weight, lambda *y: two.embed_label(torch.tensor(y))  # noqa: E731
    assert rows.shape == (22, 256) and torch.equal(embed(42)[0], rows[4] + rows[11 + 2])
    assert torch.allclose(embed(42) + embed(17), embed(47) + embed(12), atol=1e-6)  # additive over the two digits
    assert torch.equal(embed(100)[0], rows[10] + rows[21]) and not torch.allclose(embed(7), embed(70))
    cfg = bfn_mnist.prepare(["--conditional"])[0]
    torch.manual_seed(0)
    dropped = bfn_mnist.drop_labels(torch.zeros(10_000, dtype=torch.long), cfg, 0.3) == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.02 and bfn_mnist.drop_labels(None, cfg) is None


def test_conditional_training_and_sampling(mnist_dir, tmp_path):
    """--conditional end to end: the label embedding in the checkpoint's network; a grid row per class and the classes
    saved with the samples, with every sampler; the run directory remembers --conditional."""
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "2", "--conditional", "--channels", "32")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["label_embed.weight"].shape == (11, 128)  # 10 digits and the null label, 4 x 32 channels
    for sampler in ("paper", "ode", "sde"):
        run(mnist_dir, out, "--sample-only", "--channels", "32", "--num-samples", "20", "--sampler", sampler)
        saved = torch.load(os.path.join(out, f"samples-{sampler}-3.pt"), weights_only=True)
        assert saved["labels"].tolist() == sorted(list(range(10)) * 2)
    from PIL import Image

    assert Image.open(os.path.join(out, "samples.png")).size == (2 * 30 + 2, 10 * 30 + 2)  # 10 rows of 2
    with pytest.raises(SystemExit, match="--channels 32 in the checkpoint, 8 now"):  # TINY gives --channels 8
        run(mnist_dir, out, "--sample-only")
    bfn_mnist.main(["--data-dir", mnist_dir, "--out-dir", out, "--sample-only", "--sample-steps", "2"])
    assert torch.load(os.path.join(out, "samples-paper-2.pt"), weights_only=True)["config"]["conditional"]
