"""bfn_mnist.py end to end on tiny synthetic MNIST files: outputs, two digits, errors, torchrun.

    python -m pytest -q tests/test_mnist.py
"""
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bfn_mnist
from conftest import ROOT, cpu_context

TINY = ["--channels", "8", "--res-blocks", "1", "--batch-size", "4", "--eval-examples", "6", "--eval-batch-size", "4",
        "--eval-n", "inf", "3", "--sample-steps", "3", "--num-samples", "4", "--log-every", "1"]


def run(data, out, *extra):
    bfn_mnist.main(["--data-dir", data, "--out-dir", out, *TINY, *extra])


def test_three_steps_end_to_end(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "3")
    for name in ["ckpt.pt", "log.txt", "eval.json", "samples.png", "evolution.png", "evolution.gif"]:
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
    assert ckpt["step"] == 3 and set(ckpt) == {"model", "ema", "optimizer", "step", "config", "data", "script"}
    log = open(os.path.join(out, "log.txt")).read()
    assert "step 3 | loss" in log and "examples/s" in log and "settings beyond the paper's defaults:" in log
    # --eval-only and --sample-only reuse the checkpoint
    os.remove(os.path.join(out, "samples.png"))
    run(mnist_dir, out, "--sample-only")
    assert os.path.exists(os.path.join(out, "samples.png"))
    os.remove(os.path.join(out, "samples.png"))
    run(mnist_dir, out, "--sample-only", "--sampler", "ode")
    assert os.path.exists(os.path.join(out, "samples.png"))
    run(mnist_dir, out, "--sample-only", "--final", "mode")
    run(mnist_dir, out, "--eval-only", "--eval-n", "inf", "2", "5", "--eval-repeats", "3")
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert set(ev["n"]) == {"inf", "2", "5"} and ev["repeats"] == 3 and ev["examples"] == 6


def test_a_confident_wrong_pixel_is_scored_at_its_true_cost():
    """A pixel predicted black with log-odds 30 but white in the data costs -ln sigmoid(-30) = 30.0 nats, not the
    87.3 of an underflowed float32 probability."""
    net = lambda x, t: torch.full_like(x, 30.0)  # noqa: E731
    theta = torch.full((1, 28, 28, 2), 0.5)
    log_p = bfn_mnist.output_log_probs(net, theta, torch.ones(1), cpu_context())
    white = torch.zeros(1, 28, 28, dtype=torch.long)
    assert -log_p[0, 0, 0, 0].item() == pytest.approx(30.0, rel=1e-6)
    assert bfn_mnist.discrete_recon_loss(white, log_p).item() == pytest.approx(784 * 30.0, rel=1e-5)



def test_two_digits_are_64x64(mnist_dir, tmp_path):
    cfg = bfn_mnist.parse_args(["--data-dir", mnist_dir, "--digits", "2"])
    data = bfn_mnist.load_data(cfg, torch.device("cpu"))
    assert data["train"].shape == (59_400, 64, 64) and data["val"].shape == (600, 64, 64)
    assert data["test"].shape == (10_000, 64, 64) and data["train"].dtype == torch.uint8
    again = bfn_mnist.load_data(dataclasses.replace(cfg, conditional=True), torch.device("cpu"))
    assert torch.equal(data["test"], again["test"])  # deterministic given the seed, with or without labels
    assert again["test_labels"].shape == (10_000,) and again["test_labels"].max() <= 99
    assert torch.equal(data["test_labels"], again["test_labels"])  # labels are loaded with or without --conditional
    ink_left, ink_right = data["test"][:, :, :32].float().sum((1, 2)), data["test"][:, :, 32:].float().sum((1, 2))
    assert (ink_left > 0).all() and (ink_right > 0).all()  # a digit in each half
    x = bfn_mnist.binarise(data["test"][:8])
    assert set(x.unique().tolist()) <= {0, 1}
    out = str(tmp_path / "two")  # "write 42", with guidance
    run(mnist_dir, out, "--digits", "2", "--steps", "1", "--eval-examples", "2", "--num-samples", "2", "--conditional",
        "--sample-class", "42", "--guidance", "1", "--channels", "32", "--eval-samples", "2")
    quality = json.load(open(os.path.join(out, "samples.json")))[0]
    for figures, k in itertools.product((quality["samples"], quality["test"]), "ab"):  # both right: each right
        assert figures[f"accuracy_{k}"] <= min(figures[f"accuracy_tens_{k}"], figures[f"accuracy_units_{k}"]) <= 1
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["label_embed.weight"].shape[0] == 22  # tens and units: the digits 0-9 and null each
    from PIL import Image
    assert Image.open(os.path.join(out, "samples.png")).size == (2 * 66 + 2, 68)  # one row of 2


@pytest.mark.parametrize("argv,message", [
    (["--digits", "3"], "--digits takes 1 or 2, got 3"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--steps", "-5"], "--steps must be >= 0"),
    (["--eval-n", "inf", "ten"], "--eval-n takes inf or positive integers, got inf ten"),
    (["--dtype", "float8"], "--dtype takes auto, float32, bfloat16 or float16, got float8"),
    (["--sampler", "paper", "ddpm"], "--sampler takes paper, ode or sde, got ddpm"),
    (["--final", "mean"], "--final takes sample or mode, got mean"),
    (["--eval-repeats", "0"], "--eval-repeats must be >= 1"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--guidance", "2"], "--guidance needs a --conditional model"),
    (["--sample-class", "2"], "--sample-class needs a --conditional model or --grad-guidance"),
    (["--conditional", "--sample-class", "10"], "--sample-class takes all or classes 0..9, got 10"),
    (["--conditional", "--label-drop", "1"], "--label-drop must be in [0, 1)"),
    (["--conditional", "--channels", "16"], "--conditional needs a U-Net level with more channels than GroupNorm"),
])
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bfn_mnist.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_corrupt_data_file_fails_clearly(mnist_dir, tmp_path):
    path = os.path.join(mnist_dir, "MNIST", "raw", "train-images-idx3-ubyte.gz")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])  # a truncated download
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        run(mnist_dir, str(tmp_path / "run"), "--steps", "1")


def test_missing_checkpoint_fails_clearly(mnist_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "bfn_mnist.py"), "--data-dir", mnist_dir, "--out-dir", out, *TINY, "--steps", "2",
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "device cpu x 2" in log and "step 2 | loss" in log
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2


def test_sample_quality_figures(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "2", "--eval-samples", "8")
    log = open(os.path.join(out, "log.txt")).read()
    assert "training classifier a" in log and "training classifier b" in log
    assert "sample quality (paper, 3 steps, 8 samples, " in log
    q, = json.load(open(os.path.join(out, "eval.json")))["samples"]
    assert q["examples"] == 8 and q["network_calls"] == 4 and q["sampler"] == "paper" and q["steps"] == 3
    for part in ("samples", "test"):
        for k in "ab":  # two classifiers of different shapes and seeds
            assert 0 <= q[part][f"confident_{k}"] <= 1 and 0 <= q[part][f"label_entropy_bits_{k}"] <= math.log2(10)
            assert q[part][f"frechet_{k}"] >= 0
    assert q["samples"]["frechet_spread_a"] >= 0 and q["samples"]["frechet_a"] != q["samples"]["frechet_b"]
    assert len([f for f in os.listdir(os.path.join(mnist_dir, "MNIST")) if f.startswith("classifier-")]) == 2
    run(mnist_dir, out, "--sample-only", "--sampler", "ode", "--eval-samples", "4")  # the cached classifier
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("training classifier a") == 1
    assert "sample quality (ode, 3 steps, 4 samples, " in log
    assert "n" in json.load(open(os.path.join(out, "eval.json")))  # the losses are kept beside the new figures
    with pytest.raises(SystemExit, match="--eval-samples 30 needs 60 test images; the test split has 40"):
        run(mnist_dir, out, "--sample-only", "--eval-samples", "30")


def test_frechet_distance_of_gaussians_is_the_closed_form():
    """Feature sets whose sample mean is m and sample covariance diag(s^2) exactly: the distance between them is
    |m_a - m_b|^2 + sum (s_a - s_b)^2, and a rotation of both sets leaves it unchanged."""
    def points(m, s):  # 2D points m +- c s_i e_i, c^2 = (2D - 1) / 2: unbiased covariance exactly diag(s^2)
        d = len(m)
        offsets = math.sqrt((2 * d - 1) / 2) * torch.diag(torch.tensor(s, dtype=torch.float64))
        return torch.tensor(m, dtype=torch.float64) + torch.cat([offsets, -offsets])
    a, b = points([0.0, 1.0, 2.0], [1.0, 2.0, 0.5]), points([1.0, 1.0, 0.0], [3.0, 0.5, 0.5])
    expected = (1 + 0 + 4) + (4 + 2.25 + 0)
    assert bfn_mnist.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert bfn_mnist.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert bfn_mnist.frechet_distance(a @ rotation, b @ rotation) == pytest.approx(expected, rel=1e-9)


def test_digit_crops_centre_each_half():
    x = torch.zeros(2, 64, 64, dtype=torch.long)
    x[0, 10:18, 3:9] = 1  # left digit
    x[0, 40:50, 45:55] = 1  # right digit
    x[1, 30:38, 20:30] = 1
    x[1, 0:6, 58:64] = 1
    crops = bfn_mnist.digit_crops(x)  # (2, B, 28, 28)
    assert crops.shape == (2, 2, 28, 28)
    assert crops.sum((2, 3)).tolist() == [[48, 80], [100, 36]]  # every ink pixel of each half is inside its crop
    assert crops[1, 0, 10:20, 10:20].all()  # the 10x10 square, centred at (14.5, 14.5) in its crop, to the pixel


def test_every_sampler_and_step_count(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "1")
    run(mnist_dir, out, "--sample-only", "--sampler", "paper", "ode", "sde", "--sample-steps", "2", "5",
        "--eval-samples", "4")
    table = json.load(open(os.path.join(out, "samples.json")))
    assert [(r["sampler"], r["steps"], r["network_calls"]) for r in table] == [
        ("paper", 2, 3), ("paper", 5, 6), ("ode", 2, 3), ("ode", 5, 6), ("sde", 2, 3), ("sde", 5, 6)]
    assert json.load(open(os.path.join(out, "eval.json")))["samples"] == table
    for sampler in ("paper", "ode", "sde"):
        for n in (2, 5):
            assert os.path.exists(os.path.join(out, f"samples-{sampler}-{n}.png"))
            assert os.path.exists(os.path.join(out, f"evolution-{sampler}-{n}.png"))


@pytest.mark.parametrize("sampler", ["paper", "ode", "sde"])
def test_inpainting_keeps_the_known_pixels(sampler):
    cfg = bfn_mnist.parse_args(["--channels", "8", "--res-blocks", "1", "--sampler", sampler, "--sample-steps", "4",
                                "--inpaint", "bottom"])
    one = dataclasses.replace(cfg, sampler=sampler, sample_steps=4)
    net = bfn_mnist.UNet(8, (1, 2, 2), 1, 0.0).eval()
    original = torch.randint(0, 2, (3, 28, 28))
    missing = bfn_mnist.inpaint_mask(cfg, 28, torch.device("cpu"))
    assert missing[14:].all() and not missing[:14].any()
    given = torch.where(missing, -1, original)
    x = bfn_mnist.draw(net, 3, one, cpu_context(), torch.Generator().manual_seed(0), known=given)
    assert torch.equal(x[:, :14], original[:, :14])


def test_inpainting_end_to_end(mnist_dir, tmp_path):
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "1")
    run(mnist_dir, out, "--sample-only", "--inpaint", "centre", "--sampler", "paper", "ode")
    for sampler in ("paper", "ode"):
        assert os.path.exists(os.path.join(out, f"inpaint-{sampler}-3.png"))
    assert "inpainting (centre, ode, 3 steps, 1 particles, " in open(os.path.join(out, "log.txt")).read()
    from PIL import Image
    mask = str(tmp_path / "mask.png")
    Image.new("L", (20, 20), 255).save(mask)
    with pytest.raises(SystemExit, match="is 20x20 pixels; the images are 28x28"):
        run(mnist_dir, out, "--sample-only", "--inpaint", mask)
    with pytest.raises(SystemExit):
        bfn_mnist.parse_args(["--inpaint", "middle"])


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
        out = {y: bfn_mnist.output_log_probs(net, theta, t, cpu_context(), torch.tensor([y, y]))
               for y in (3, 7, 10)}
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
    cfg = bfn_mnist.parse_args(["--conditional", "--label-drop", "0.3"])
    torch.manual_seed(0)
    dropped = bfn_mnist.drop_labels(torch.zeros(10_000, dtype=torch.long), cfg) == 10
    assert abs(dropped.float().mean().item() - 0.3) < 0.02 and bfn_mnist.drop_labels(None, cfg) is None


@pytest.mark.parametrize("sampler", ["paper", "ode", "sde"])
def test_guided_probabilities_are_the_formula(sampler):
    """A stand-in network whose logit of black is the label: guidance w combines the label-7 and null-label (10)
    predictions linearly, (1 + w) p_O(. | 7) - w p_O(. | null), from one call on both batches."""
    calls = []

    def net(x, t, y):
        calls.append(len(x))
        return y.float()[:, None, None].expand_as(x) / 4

    cfg = dataclasses.replace(bfn_mnist.parse_args(["--conditional"]), guidance=1.5, sampler=sampler)
    theta, t, y = torch.full((2, 28, 28, 2), 0.5), torch.zeros(2), torch.tensor([7, 7])
    probs = bfn_mnist.guided_probs(net, theta, t, y, cfg, cpu_context())
    cond, uncond = torch.tensor(7 / 4), torch.tensor(10 / 4)  # logits of black
    torch.testing.assert_close(probs[..., 1], (2.5 * torch.sigmoid(cond) - 1.5 * torch.sigmoid(uncond)).expand(2, 28,
                                                                                                              28))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 28, 28))
    assert calls == [4]
    cfg = dataclasses.replace(cfg, guidance=0.0)  # w = 0: the conditional model alone, one plain call
    torch.testing.assert_close(bfn_mnist.guided_probs(net, theta, t, y, cfg, cpu_context())[..., 1],
                               torch.sigmoid(cond).expand(2, 28, 28))


def test_conditional_training_and_guided_sampling(mnist_dir, tmp_path):
    """--conditional end to end: labels in the data fingerprint and the checkpoint's network; a grid row per
    requested class; every sampler with every guidance weight; accuracy and per-class Fréchet distances."""
    counts = torch.bincount(bfn_mnist.load_mnist(mnist_dir)["test"][1].long(), minlength=10)
    a, b = (counts >= 4).nonzero()[:2, 0].tolist()  # two classes with 2 + 2 test images each
    out = str(tmp_path / "run")
    run(mnist_dir, out, "--steps", "2", "--conditional", "--channels", "32")
    log = open(os.path.join(out, "log.txt")).read()
    assert "train_labels 198" in log and "test_labels 40" in log
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["model"]["label_embed.weight"].shape == (11, 128)  # 10 digits and the null label, 4 x 32 channels
    run(mnist_dir, out, "--sample-only", "--conditional", "--channels", "32", "--sample-class", str(a), str(b),
        "--num-samples", "6", "--guidance", "0", "2", "--sampler", "paper", "ode", "sde", "--eval-samples", "4")
    table = json.load(open(os.path.join(out, "samples.json")))
    assert [(r["sampler"], r["guidance"]) for r in table] == [(s, w) for s in ("paper", "ode", "sde") for w in (0, 2)]
    for r in table:
        assert 0 <= r["samples"]["accuracy_a"] <= 1 and r["test"]["accuracy_b"] >= 0
        assert set(r["samples"]["frechet_by_class_a"]) == {str(a), str(b)}
    from PIL import Image
    assert Image.open(os.path.join(out, "samples-sde-3-g2.png")).size == (3 * 30 + 2, 2 * 30 + 2)  # 2 rows of 3
    assert "sample quality (ode, 3 steps, guidance 2, 4 samples, " in open(os.path.join(out, "log.txt")).read()
    with pytest.raises(SystemExit, match="--channels 32 in the checkpoint, 8 now"):  # TINY gives --channels 8
        run(mnist_dir, out, "--sample-only")
    bfn_mnist.main(["--data-dir", mnist_dir, "--out-dir", out, "--sample-only", "--sample-steps", "2"])
    assert "--conditional" in open(os.path.join(out, "log.txt")).read().split("====")[-1]  # the directory remembers



def test_gradient_guidance_and_particles_end_to_end(mnist_dir, tmp_path):
    """--grad-guidance towards a class through the classifier of theta (trained once, cached) with every sampler, and
    inpainting by sequential Monte Carlo with the stochastic samplers, on an unconditional model."""
    out, counts = str(tmp_path / "run"), torch.bincount(bfn_mnist.load_mnist(mnist_dir)["test"][1].long(), minlength=10)
    run(mnist_dir, out, "--steps", "1")
    run(mnist_dir, out, "--sample-only", "--grad-guidance", "0", "2", "--sample-class", str((counts >= 4).nonzero()[0, 0]
        .item()), "--sampler", "paper", "ode", "sde", "--eval-samples", "2")
    table = json.load(open(os.path.join(out, "samples.json")))
    assert [(r["sampler"], r["grad_guidance"]) for r in table] == [(s, w) for s in ("paper", "ode", "sde") for w in (0, 2)]
    assert all(0 <= r["samples"]["accuracy_a"] <= 1 for r in table)
    assert "training classifier guide" in open(os.path.join(out, "log.txt")).read()
    assert len([f for f in os.listdir(os.path.join(mnist_dir, "MNIST")) if f.startswith("classifier-guide")]) == 1
    run(mnist_dir, out, "--sample-only", "--inpaint", "bottom", "--particles", "3", "--sampler", "paper", "sde")
    log = open(os.path.join(out, "log.txt")).read()
    assert "inpainting (bottom, sde, 3 steps, 3 particles, " in log and "by classifier b" in log
    with pytest.raises(SystemExit):
        bfn_mnist.parse_args(["--inpaint", "bottom", "--particles", "3", "--sampler", "ode"])
