"""Bayesian Flow Network on dynamically binarised MNIST (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 2.

Trains the authors' U-Net with the continuous-time loss L^inf (Algorithm 8), evaluates the test negative
log-likelihood bound L^inf + L^r and L^n + L^r in nats/image, and samples with Algorithm 9 or the ODE or SDE solver.
`--digits 2` trains on 64x64 images of two MNIST digits side by side instead.

    python bfn_mnist.py --preset quick       # a 1.08M-parameter U-Net for minutes on a laptop CPU
    python bfn_mnist.py --preset quick --digits 2 --steps 1000 --eval-samples 200  # two digits, ≈35 min on 2 cores
    python bfn_mnist.py                      # the paper's model and optimiser (24.8M parameters, batch 512)
    torchrun --nproc_per_node=8 bfn_mnist.py --batch-size 64      # the same global batch on 8 GPUs
    python bfn_mnist.py --eval-only --eval-n inf 10 25 50 100 784  # the paper's table, from runs/bfn_mnist/ckpt.pt
    python bfn_mnist.py --preset quick --conditional         # class-conditional (labels dropped 10% of the time), then:
    python bfn_mnist.py --preset quick --conditional --sample-only --sampler ode --sample-steps 10 --guidance 3
    python bfn_mnist.py --preset quick --digits 2 --conditional --steps 1000 --sample-class 42   # labels 00-99

Paper: 77.87 nats/image (L^inf + L^r, test set); by steps n: 10 ≈ 95.2, 25 ≈ 84.4, 50 ≈ 81.1, 100 ≈ 79.5,
784 ≈ 78.0.
Measured: --preset quick, 90.95 ± 0.73 nats/image on all 10,000 test images; 2 AMD EPYC CPU cores, torch 2.14.1,
2026-11-29.

Outputs in --out-dir (default runs/bfn_mnist): log.txt, ckpt.pt (and ckpt-prev.pt), eval.json, samples.png (8x8
final samples; 4x4 for --digits 2) and evolution.png (for each of 4 samples, two rows: the input probability theta of
a black pixel, then the network's output probability, at t = 0, 0.1, ..., 1 left to right), evolution.gif (the same
at every step, for 8 samples). With --eval-samples N, sample quality through a digit classifier, in eval.json and
samples.json (one row per --sampler and --sample-steps: `--sampler paper ode --sample-steps 10 25 100` runs each).
With --conditional, samples.png has one row per class (--sample-class), each --guidance weight is sampled in turn, and
the sample quality adds the fraction classified as the requested class; --inpaint completes test images (inpaint.png).
Shapes: B batch, H x W image (28 or 64), K = 2 classes (0 = white, 1 = black ink), C channels.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import gzip
import itertools
import json
import math
import os
import resource
import signal
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import discrete_flow, discrete_loss_inf, discrete_loss_n, discrete_recon_loss, discrete_sample, \
    discrete_sample_ode, discrete_sample_sde, stratified_steps

SCRIPT, UNIT = "bfn_mnist.py", "nats/image"
K = 2  # white and black pixels

# ----------------------------------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (--batch-size for batch_size); defaults are the paper's.


def opt(default, help, fixed=False):
    """A setting: its default, its --help, and whether it fixes the model or the data (a resumed run must keep it)."""
    return field(default=default, metadata={"help": help, "fixed": fixed})


@dataclass
class Config:
    """Every setting of a run; parse_args makes each a flag, and the checkpoint stores them."""
    preset: str = opt("", "paper: the authors' model and optimiser (the defaults); quick: the README's CPU recipe")
    # data
    data_dir: str = opt("data", "where MNIST is downloaded / found (torchvision's layout: DIR/MNIST/raw/*.gz)")
    digits: int = opt(1, "1: 28x28 MNIST; 2: 64x64 images of two digits side by side", fixed=True)
    conditional: bool = opt(False, "class-conditional: the network also sees the label (the digit; the number 00-99 "
                                   "for --digits 2), or a null label (--label-drop of the time)", fixed=True)
    label_drop: float = opt(0.1, "with --conditional: the fraction of training labels replaced by the null label, so "
                                 "that one network is both p(x | class) and p(x) (classifier-free guidance)")
    # BFN
    beta_1: float = opt(9.0, "final accuracy beta(1) of the schedule beta(t) = beta(1) t^2 (§6.8)", fixed=True)
    # network
    channels: int = opt(128, "U-Net base channels", fixed=True)
    res_blocks: int = opt(2, "residual blocks per U-Net level", fixed=True)
    dropout: float = opt(0.5, "dropout in the residual blocks")
    # optimisation
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)")
    batch_size: int = opt(512, "examples per process and micro-batch (global: batch size x grad accum x processes)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    lr: float = opt(1e-4, "AdamW learning rate (the peak, with a schedule)")
    lr_warmup: int = opt(0, "steps of linear learning-rate warm-up from 0 (0: none, the paper's)")
    lr_decay: str = opt("none", "learning-rate decay after the warm-up: none (constant, the paper's), cosine or linear")
    lr_final: float = opt(0.1, "with --lr-decay: the learning rate at --steps, as a fraction of --lr")
    betas: tuple = opt((0.9, 0.98), "AdamW betas")
    weight_decay: float = opt(0.01, "AdamW weight decay (on the weights of linear and convolution layers only)")
    grad_clip: float = opt(5.0, "clip the gradient norm to this")
    ema_decay: float = opt(0.9999, "EMA decay of the weights used to evaluate and sample (warmed up)")
    # evaluation and sampling
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test losses L^n + L^r ('inf': continuous time)")
    eval_examples: int = opt(0, "evaluate on the first N test images (0: all 10,000)")
    eval_repeats: int = opt(1, "passes over them, with fresh binarisations and noise (the authors: 2000 at n = 784)")
    eval_batch_size: int = opt(500, "examples per evaluation batch")
    inpaint: str = opt("", "complete test images with a region missing: top, bottom, left, right or centre (that half, "
                           "or the middle half each way, is generated), or a mask image (H x W, white = generate)")
    eval_samples: int = opt(0, "sample quality: draw N samples and compare them with N test images through a digit "
                               "classifier (Fréchet distance of its features, confident fraction, label entropy)")
    sample_steps: tuple = opt((100,), "generation steps n of Algorithm 9; several: each, with each --sampler")
    num_samples: int = opt(64, "images in samples.png")
    sampler: tuple = opt(("paper",), "paper: the paper's sampler; ode: the second-order probability-flow ODE solver; "
                                     "sde: the second-order SDE solver (both for few steps); several: each")
    sample_class: tuple = opt(("all",), "with --conditional: the classes to sample (e.g. 4 2; for --digits 2 the "
                                        "number, e.g. 42), one grid row each; all: every class")
    guidance: tuple = opt((0.0,), "with --conditional: the classifier-free guidance weight w (0: the conditional "
                                  "model, no guidance); several: each")
    guide_on: str = opt("inputs", "inputs: guidance on the Bayesian updates of theta, (1 + w) p_cond - w p_uncond, for "
                                  "the ode and sde samplers (measured better); outputs: (1 + w) ln p_cond - w ln "
                                  "p_uncond (always for the paper's sampler, which draws a class from p_O)")
    final: str = opt("sample", "the samplers' result at t = 1: sample (a draw of p_O, the paper's) or mode (its most "
                               "likely value, as the authors' release)")
    # run
    out_dir: str = opt("runs/bfn_mnist", "run directory: log.txt, ckpt.pt, eval.json, samples.png, evolution.png")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt (or ckpt-prev.pt if ckpt.pt is unreadable)")
    init_from: str = opt("", "start from the weights of another run's ckpt.pt or of an authors' checkpoint (fresh "
                             "optimiser, step 0): fine-tune, or evaluate and sample with --eval-only / --sample-only")
    eval_only: bool = opt(False, "load <out-dir>/ckpt.pt, evaluate on the test set, exit")
    sample_only: bool = opt(False, "load <out-dir>/ckpt.pt, sample, exit")
    seed: int = opt(0, "everything random derives from it")
    device: str = opt("auto", "auto (cuda, mps, cpu), or a torch device such as cuda:0")
    dtype: str = opt("auto", "autocast dtype around the network: auto (bfloat16 on cuda), float32, bfloat16, float16")
    compile: bool = opt(False, "torch.compile the network for training")
    log_every: int = opt(100, "steps between log lines (the first comes after a few seconds)")
    eval_every: int = opt(5000, "steps between evaluations on the validation split (0: only at the end, on test)")
    sample_every: int = opt(5000, "steps between samples (0: only at the end)")
    ckpt_every: int = opt(1000, "steps between checkpoints")


# --preset quick: the measured CPU recipe of the README (≈8 minutes on 2 CPU cores); paper: the defaults above.
PRESETS = {"paper": {}, "quick": dict(channels=32, res_blocks=1, dropout=0.0, lr=1e-3, batch_size=32, steps=1600,
                                      eval_every=0, sample_every=0, eval_examples=2000)}


def parse_args(argv=None):
    """Command line -> Config: the preset's values, then the flags given; a bad value stops with one line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.type is tuple:
            p.add_argument(flag, nargs="+", type=type(f.default[0]), default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"])
    preset = p.parse_known_args(argv)[0].preset
    if preset not in ("", *PRESETS):
        p.error(f"--preset must be {' or '.join(PRESETS)}, got {preset}")
    p.set_defaults(**PRESETS[preset or "paper"])  # explicit flags still win
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})
    for bad, message in [
        (cfg.digits not in (1, 2), f"--digits must be 1 or 2, got {cfg.digits}"),
        (cfg.steps < 0, f"--steps must be >= 0, got {cfg.steps}"),
        (cfg.batch_size < 1 or cfg.grad_accum < 1, "--batch-size and --grad-accum must be >= 1"),
        (cfg.channels < 8 or cfg.channels % 8 != 0, f"--channels must be a positive multiple of 8, got {cfg.channels}"),
        (cfg.res_blocks < 1, f"--res-blocks must be >= 1, got {cfg.res_blocks}"),
        (not 0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.beta_1 <= 0, f"--beta-1 must be > 0, got {cfg.beta_1}"),
        (cfg.lr <= 0 or cfg.grad_clip <= 0, "--lr and --grad-clip must be > 0"),
        (cfg.lr_warmup < 0 or cfg.lr_decay not in ("none", "cosine", "linear") or not 0 <= cfg.lr_final <= 1,
         "--lr-warmup must be >= 0, --lr-decay none, cosine or linear, --lr-final in [0, 1]"),
        (not 0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
        (len(cfg.betas) != 2, "--betas takes two numbers"),
        (any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n),
         f"--eval-n takes 'inf' or positive integers, got {' '.join(cfg.eval_n)}"),
        (cfg.eval_examples < 0 or cfg.eval_batch_size < 1, "--eval-examples must be >= 0 and --eval-batch-size >= 1"),
        (min(cfg.sample_steps) < 1 or cfg.num_samples < 1, "--sample-steps and --num-samples must be >= 1"),
        (cfg.eval_samples < 0 or cfg.eval_samples == 1, f"--eval-samples must be 0 or >= 2, got {cfg.eval_samples}"),
        (not set(cfg.sampler) <= {"paper", "ode", "sde"},
         f"--sampler takes paper, ode or sde, got {' '.join(cfg.sampler)}"),
        (cfg.final not in ("sample", "mode"), f"--final must be sample or mode, got {cfg.final}"),
        (not 0 <= cfg.label_drop < 1, f"--label-drop must be in [0, 1), got {cfg.label_drop}"),
        (cfg.conditional and cfg.channels < 32, "--conditional needs --channels 32 or more: below, every U-Net level "
         "has at most 32 channels, one per GroupNorm group, and the normalisation erases the label embedding"),
        (not cfg.conditional and (cfg.sample_class != ("all",) or any(cfg.guidance)),
         "--sample-class and --guidance need a --conditional model"),
        (any(c != "all" and not (c.isdigit() and int(c) < 10 ** cfg.digits) for c in cfg.sample_class),
         f"--sample-class takes all or classes 0..{10 ** cfg.digits - 1}, got {' '.join(cfg.sample_class)}"),
        (min(cfg.guidance) < -1, f"--guidance must be >= -1 (-1: the unconditional model), got {min(cfg.guidance)}"),
        (cfg.guide_on not in ("outputs", "inputs"), f"--guide-on takes inputs or outputs, got {cfg.guide_on}"),
        (cfg.inpaint not in ("", *INPAINT_REGIONS) and not os.path.isfile(cfg.inpaint),
         f"--inpaint takes {', '.join(INPAINT_REGIONS)} or a mask image file, got {cfg.inpaint}"),
        (cfg.eval_repeats < 1, f"--eval-repeats must be >= 1, got {cfg.eval_repeats}"),
        (min(cfg.log_every, cfg.ckpt_every) < 1 or min(cfg.eval_every, cfg.sample_every) < 0,
         "--log-every and --ckpt-every must be >= 1, --eval-every and --sample-every >= 0"),
        (cfg.dtype not in ("auto", "float32", "bfloat16", "float16"),
         f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype}"),
        (cfg.eval_only and cfg.sample_only, "--eval-only and --sample-only exclude each other"),
        (cfg.resume and bool(cfg.init_from), "--resume and --init-from exclude each other"),
    ]:
        if bad:
            p.error(message)
    return cfg


def flag_value(value):
    """A setting's value as the command line writes it: flag_value(("inf", "10")) = "inf 10"."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def as_flag(name, value):
    """A setting and its value as the command line writes them: as_flag("eval_n", ("inf", "10")) = "--eval-n inf 10",
    as_flag("eval_only", True) = "--eval-only"."""
    flag = f"--{name.replace('_', '-')}"
    return flag if value is True else f"{flag} {flag_value(value)}"


def preset_overrides(cfg):
    """The settings whose values differ from the preset's, as '--flag value' strings."""
    base = dataclasses.asdict(parse_args(["--preset", cfg.preset] if cfg.preset else []))
    return [as_flag(k, v) for k, v in dataclasses.asdict(cfg).items() if k != "preset" and v != base[k]]


# ----------------------------------------------------------------------------------------------------------------------
# Data: MNIST as uint8 tensors on the device; every read draws a fresh binarisation.

MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path, magic, kind):
    """An MNIST idx file (gzip's CRC-32 checks the bytes): images (magic 2051) -> (N, rows, cols) uint8, or labels
    (magic 2049) -> (N,) uint8; kind names it in errors."""
    fix = "Delete it and run again to re-download."
    dims = 3 if magic == 2051 else 1
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        found, *shape = struct.unpack(f">{1 + dims}I", raw[:4 + 4 * dims])
    except (OSError, EOFError, struct.error) as e:
        raise SystemExit(f"{SCRIPT}: error: {path} is corrupt or truncated ({e}). {fix}")
    header = 4 + 4 * dims
    if found != magic or len(raw) != header + math.prod(shape):
        raise SystemExit(f"{SCRIPT}: error: {path} is not an MNIST {kind} file (magic {found}, {len(raw)} bytes for "
                         f"{'x'.join(map(str, shape))}). {fix}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load_mnist_labels(data_dir):
    """{train, test}: (N,) uint8 digit labels (files found or downloaded by load_mnist)."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    return {split: read_idx(os.path.join(raw, files[1]), 2049, "idx1 label") for split, files in MNIST_FILES.items()}


def load_mnist(data_dir):
    """{train, test}: (N, 28, 28) uint8 in 0..255. Downloads with torchvision (MD5-checked) if the files are missing."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    if not all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES["train"] + MNIST_FILES["test"]):
        import torchvision
        try:
            for is_train in (True, False):
                torchvision.datasets.MNIST(data_dir, train=is_train, download=True)
        except Exception as e:
            raise SystemExit(f"{SCRIPT}: error: downloading MNIST into {raw} failed ({e}). Check the network, or put "
                             f"the four MNIST .gz files there by hand.")
    return {split: read_idx(os.path.join(raw, files[0]), 2051, "idx3 image") for split, files in MNIST_FILES.items()}


def two_digit_images(digits, labels, n, seed):
    """n 64x64 images of two random digits side by side, each at a random vertical offset (0..36) and a horizontal
    jitter (0..4) within its half, and their labels, the numbers 10 left + right; deterministic given the seed.
    (N, 28, 28), (N,) -> (n, 64, 64) uint8, (n,) uint8."""
    g = torch.Generator().manual_seed(seed)
    canvas, number = torch.zeros(n, 64, 64, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    for half in (0, 32):
        which = torch.randint(len(digits), (n,), generator=g)
        number = 10 * number + labels[which]
        dy = torch.randint(0, 37, (n,), generator=g)
        dx = half + torch.randint(0, 5, (n,), generator=g)
        for y in range(37):
            for x in range(half, half + 5):
                m = (dy == y) & (dx == x)
                canvas[m, y:y + 28, x:x + 28] = digits[which[m]]
    return canvas, number


def load_data(cfg, device):
    """{train, val, test}: uint8 grey levels (N, H, W) on the device; train/val is a fixed 99% / 1% split. With
    --conditional also {train, val, test}_labels: (N,) uint8 classes (the digit, or the number 00-99)."""
    mnist = load_mnist(cfg.data_dir)
    labels = load_mnist_labels(cfg.data_dir) if cfg.conditional or cfg.digits == 2 else None
    if cfg.digits == 2:
        (train, train_labels), (test, test_labels) = [two_digit_images(mnist[s], labels[s], n, cfg.seed + k)
                                                      for k, (s, n) in enumerate([("train", 60_000), ("test", 10_000)])]
        mnist, labels = {"train": train, "test": test}, {"train": train_labels, "test": test_labels}
    perm = torch.randperm(len(mnist["train"]), generator=torch.Generator().manual_seed(0))
    n_val = len(perm) // 100  # 600 of 60,000
    splits = {"": mnist} if not cfg.conditional else {"": mnist, "_labels": labels}
    return {name + suffix: part.to(device) for suffix, d in splits.items()
            for name, part in [("train", d["train"][perm[n_val:]]), ("val", d["train"][perm[:n_val]]),
                               ("test", d["test"])]}


def binarise(images, generator=None):
    """Dynamic binarisation: pixel = 1 with probability grey / 255, a fresh draw every time. (B, H, W) -> long."""
    return torch.bernoulli(images.float() / 255, generator=generator).long()


def get_batch(data, cfg):
    """A random training batch: (B, H, W) pixel classes and, with --conditional, their (B,) labels (else None); the
    global RNG is seeded per step."""
    idx = torch.randint(len(data["train"]), (cfg.batch_size,), device=data["train"].device)
    return binarise(data["train"][idx]), data["train_labels"][idx].long() if cfg.conditional else None


def swept(cfg):
    """The sampling settings that take several values, each sampled in turn (sample_all)."""
    return ("sampler", "sample_steps", "guidance") if cfg.conditional else ("sampler", "sample_steps")


def num_classes(cfg):
    """The labels of --conditional: 10 digits, or the numbers 00-99 for --digits 2; index num_classes is the null
    label (no class given). 0 when unconditional."""
    return 10 ** cfg.digits if cfg.conditional else 0


def evaluation_set(images, cfg):
    """The first --eval-examples images of a split (all if 0). (N, H, W) uint8."""
    return images[:cfg.eval_examples or None]


def to_unit(nats, cfg):
    """Nats per example -> the paper's unit (nats/image: unchanged)."""
    return nats


# ----------------------------------------------------------------------------------------------------------------------
# Network: the authors' improved-diffusion U-Net for MNIST (mults (1, 2, 2), attention in the middle), tensor for
# tensor: their parameter names (without the `net.` prefix), shapes and function, so their checkpoints load as they are.

def group_norm(c):
    """GroupNorm with 32 groups (the authors'), or fewer when c is not a multiple of 32."""
    return nn.GroupNorm(math.gcd(32, c), c)


def zero(layer):
    """The layer with its weights and bias set to zero: a residual branch that starts switched off."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def time_embedding(t, dim):
    """Sinusoidal features [cos, sin] of 4000 t (the authors' scale). (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = 4000 * t.float()[:, None] * freqs  # (B, dim / 2)
    return torch.cat([args.cos(), args.sin()], -1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; plus the time embedding; GroupNorm, SiLU, dropout, conv; plus the (projected) input."""

    def __init__(self, c_in, c_out, c_emb, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(c_emb, c_out))
        self.out_layers = nn.Sequential(group_norm(c_out), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, c_emb) -> (B, c_out, H, W)
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]  # (B, c_out, H, W)
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions, with a residual connection; the qkv channels are laid out
    per head (q, k, v of head 0, then of head 1, ...), as in the authors' network."""

    def __init__(self, c, heads=4):
        super().__init__()
        self.heads, self.norm = heads, group_norm(c)
        self.qkv, self.proj_out = nn.Conv1d(c, 3 * c, 1), zero(nn.Conv1d(c, c, 1))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        h = x.flatten(2)  # (B, C, H W)
        qkv = rearrange(self.qkv(self.norm(h)), "b (h three d) s -> three b h s d", three=3, h=self.heads)
        h = F.scaled_dot_product_attention(*qkv.contiguous())  # (B, heads, H W, C / heads); contiguous: fast on CPU
        return x + self.proj_out(rearrange(h, "b h s d -> b (h d) s")).view_as(x)


class Downsample(nn.Module):
    """A stride-2 convolution. (B, C, H, W) -> (B, C, H / 2, W / 2)."""

    def __init__(self, c):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling, then a convolution. (B, C, H, W) -> (B, C, 2 H, 2 W)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Layers(nn.ModuleList):
    """Layers applied in turn, the residual blocks with the time embedding too."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    """Psi(theta, t): the input 2 theta_0 - 1 (theta_0: the probability of a white pixel, the authors' convention)
    (B, H, W) and t (B,); output the logit of a black pixel (B, H, W).
    Each pixel's [2 theta_0 - 1, 2 t - 1] is projected to `channels` features; the U-Net's output features are
    concatenated with those projected inputs and a linear layer gives the logit.
    With classes > 0 (class-conditional: 10 digits, or the 100 numbers 00-99), a label y (B,) in 0..classes (classes:
    the null label, also used when y is None) adds a learned embedding to the time embedding (embed_label); with
    classes = 0 it is the authors' network exactly."""

    def __init__(self, channels=128, mults=(1, 2, 2), res_blocks=2, dropout=0.5, classes=0):
        super().__init__()
        c_emb, ch = 4 * channels, channels
        self.channels, self.classes = channels, classes
        self.input_projection = nn.Linear(2, channels)
        self.time_embed = nn.Sequential(nn.Linear(channels, c_emb), nn.SiLU(), nn.Linear(c_emb, c_emb))
        if classes:  # a row per (position, digit 0-9 or null) of the label's decimal digits: 11 rows, or 22 for 00-99
            self.digits = len(str(classes - 1))
            self.label_embed = nn.Embedding(11 * self.digits, c_emb)
        self.input_blocks = nn.ModuleList([Layers([nn.Conv2d(ch, ch, 3, padding=1)])])
        skips = [ch]
        for level, mult in enumerate(mults):
            for _ in range(res_blocks):
                self.input_blocks.append(Layers([ResBlock(ch, channels * mult, c_emb, dropout)]))
                ch = channels * mult
                skips.append(ch)
            if level < len(mults) - 1:
                self.input_blocks.append(Layers([Downsample(ch)]))
                skips.append(ch)
        self.middle_block = Layers([ResBlock(ch, ch, c_emb, dropout), Attention(ch), ResBlock(ch, ch, c_emb, dropout)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(res_blocks + 1):
                layers = Layers([ResBlock(ch + skips.pop(), channels * mult, c_emb, dropout)])
                ch = channels * mult
                if level > 0 and i == res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(layers)
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, channels, 3, padding=1)))
        self.output_projection = nn.Linear(2 * channels, 1)

    def forward(self, x, t, y=None):  # (B, H, W), (B,), (B,) or None -> (B, H, W)
        features = torch.stack([x, (2 * t - 1)[:, None, None].expand_as(x)], -1)  # (B, H, W, 2)
        x = self.input_projection(features)  # (B, H, W, channels)
        emb = self.time_embed(time_embedding(t, self.channels))  # (B, 4 channels)
        if self.classes:
            emb = emb + self.embed_label(torch.full_like(t, self.classes, dtype=torch.long) if y is None else y)
        h, hs = x.permute(0, 3, 1, 2), []  # (B, channels, H, W)
        for layers in self.input_blocks:
            h = layers(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for layers in self.output_blocks:
            h = layers(torch.cat([h, hs.pop()], 1), emb)  # (B, C + C_skip, H', W'): the skip connection
        out = self.out(h).permute(0, 2, 3, 1)  # (B, H, W, channels)
        return self.output_projection(torch.cat([x, out], -1))[..., 0]

    def embed_label(self, y):  # (B,) -> (B, 4 channels)
        """The sum over the label's decimal digits of a learned vector for (position, digit), the null label being
        the null digit 10 at every position: one digit, one row per label; for 00-99 the tens and the units each
        have their own ten rows, so what a 4 looks like on the left is learnt from every number 40-49, not from the
        1% of images that show 42 (the two halves of a two-digit image are independent digits)."""
        null, emb = y == self.classes, 0
        for position in range(self.digits):
            digit = torch.where(null, 10, y // 10 ** (self.digits - 1 - position) % 10)
            emb = emb + self.label_embed(11 * position + digit)
        return emb


def from_authors(state):
    """A state_dict of the authors' BFN module (`net.` + their names) -> this network's: the output layer is theirs
    `output_adapter.output_projection`; their input adapter holds only fixed features (not used by this network)."""
    state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    state = {k.replace("output_adapter.output_projection.", "output_projection."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("input_adapter.")}


NETWORK_FLAGS = "--channels, --res-blocks, --conditional"


# ----------------------------------------------------------------------------------------------------------------------
# BFN glue: the network as the output distribution p_O(. | theta, t) of discrete data (§6.4), and the losses.

def output_log_probs(net, theta, t, autocast, y=None):
    """ln p_O(k | theta, t) (given the labels y (B,) of a conditional network) from one logit per pixel, as
    log-sigmoids in float32 (exact for confident pixels): theta (B, H, W, 2), t (B,) -> (B, H, W, 2)."""
    with autocast:
        logit = net(2 * theta[..., 0] - 1, t) if y is None else net(2 * theta[..., 0] - 1, t, y)  # (B, H, W)
    logit = logit.float()  # the log-odds of black
    return torch.stack([F.logsigmoid(-logit), F.logsigmoid(logit)], -1)


def drop_labels(y, cfg):
    """Training labels (B,) with a fraction --label-drop replaced by the null label, so that one network learns both
    p(x | class) and p(x); None (unconditional) stays None."""
    if y is None:
        return None
    return torch.where(torch.rand(len(y), device=y.device) < cfg.label_drop, num_classes(cfg), y)


def guided_probs(net, theta, t, y, cfg, autocast):
    """p_O(. | theta, t) for sampling: unconditional if y is None, else given the labels y (B,) with classifier-free
    guidance w = --guidance (Ho and Salimans, arXiv:2207.12598; beyond the BFN paper), from one network call on the
    conditional and the null-label batch together.
    On the inputs (--guide-on inputs, the default, for the ODE and SDE samplers): (1 + w) p_O(. | y) - w p_O(. | null).
    These samplers use p_O only through the mean of the Bayesian update of the logits of theta, so this is exactly
    (1 + w) times the conditional update of ln theta minus w times the unconditional one, with the same noise:
    guidance on the input parameters (tests/test_common.py checks it). At t = 1 a value outside [0, 1] draws as if
    clipped. On the outputs (--guide-on outputs, and always for the paper's sampler, whose update needs a class drawn
    from a distribution): ln p = (1 + w) ln p_O(. | y) - w ln p_O(. | null), normalised.
    Measured on conditional MNIST (README; 10-step ODE and SDE, 1000 samples): at the same w both put about as many
    samples in the requested class (98.5-99.9%), and guidance on the inputs stays closer to the real digits of that
    class (Fréchet distance 37.8 against 52.9 at w = 1, 104.7 against 198.1 at w = 3, ODE): it sharpens the update
    linearly in probability, where the outputs' log-space extrapolation pushes every uncertain pixel to one side.
    Hence the default."""
    w = cfg.guidance
    if y is None or w == 0:
        return output_log_probs(net, theta, t, autocast, y).exp()
    null = torch.full_like(y, num_classes(cfg))
    both = output_log_probs(net, theta.repeat(2, 1, 1, 1), t.repeat(2), autocast, torch.cat([y, null]))
    log_cond, log_uncond = both.chunk(2)
    if cfg.guide_on == "inputs" and cfg.sampler != "paper":
        return (1 + w) * log_cond.exp() - w * log_uncond.exp()
    return torch.softmax((1 + w) * log_cond - w * log_uncond, -1)


def train_loss(net, batch, cfg, autocast):
    """L^inf (§6.7, Algorithm 8) of a batch (x (B, H, W), labels (B,) or None): t ~ U(0, 1),
    theta ~ p_F(. | x; t). (B,) nats/image."""
    x, y = batch
    t = torch.rand(len(x), device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, K)
    return discrete_loss_inf(x, output_log_probs(net, theta, t, autocast, drop_labels(y, cfg)).exp(), t, cfg.beta_1)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and sampling (with the EMA network)

@torch.no_grad()
def evaluate(net, images, cfg, autocast, seed):
    """Test bound -ln p(x) <= L^n + L^r for each n in --eval-n, in nats/image, over --eval-repeats passes with fresh
    binarisations and noise; the steps i of L^n are stratified over the examples. images (N, H, W) uint8 ->
    {n: {loss, recon, total, stderr}}."""
    g = torch.Generator(images.device).manual_seed(seed)
    flow = lambda x, t: discrete_flow(x, t, cfg.beta_1, K, g)  # noqa: E731
    log_p = lambda x, t: output_log_probs(net, flow(x, t), t, autocast)  # noqa: E731  ln p_O at theta ~ p_F(. | x; t)
    losses, recon = {n: [] for n in cfg.eval_n}, []
    progress = Progress("evaluating", cfg.eval_repeats * math.ceil(len(images) / cfg.eval_batch_size))
    for _ in range(cfg.eval_repeats):
        steps = {n: stratified_steps(int(n), len(images), g, images.device) for n in cfg.eval_n if n != "inf"}
        for start in range(0, len(images), cfg.eval_batch_size):
            progress.tick()
            x = binarise(images[start:start + cfg.eval_batch_size], g)
            B = len(x)
            ones = torch.ones(B, device=x.device)
            recon.append(discrete_recon_loss(x, log_p(x, ones)))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(B, generator=g, device=x.device)
                    loss = discrete_loss_inf(x, log_p(x, t).exp(), t, cfg.beta_1)
                else:
                    i = steps[n][start:start + B]
                    t = (i - 1) / int(n)
                    loss = discrete_loss_n(x, log_p(x, t), i, int(n), cfg.beta_1, g)
                losses[n].append(loss)
    return summarise(losses, recon, cfg)


class Progress:
    """For long evaluations and sampling runs: 'label: done / total | seconds | ETA' at most every 30 seconds."""

    def __init__(self, label, total, every=30.0):
        self.label, self.total, self.every, self.done = label, total, every, 0
        self.start = self.last = time.time()

    def tick(self):
        """One unit of work done; print a line if the last was `every` seconds ago."""
        self.done += 1
        now = time.time()
        if now - self.last >= self.every:
            eta_min = (now - self.start) / self.done * (self.total - self.done) / 60
            print(f"{self.label}: {self.done} / {self.total} | {now - self.start:.0f} s | ETA {eta_min:.1f} min",
                  flush=True)
            self.last = now


def summarise(losses, recon, cfg):
    """Per-example losses in nats, pass after pass -> {n: {loss, recon, total, stderr}} in the paper's unit. Each
    example's losses are averaged over the passes first, so the standard error is over examples."""
    per_example = lambda parts: to_unit(torch.cat(parts).double().view(cfg.eval_repeats, -1).mean(0), cfg)  # noqa: E731
    recon = per_example(recon)
    result = {}
    for n, parts in losses.items():
        total = per_example(parts) + recon
        stderr = total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")
        result[n] = {"loss": (total - recon).mean().item(), "recon": recon.mean().item(), "total": total.mean().item(),
                     "stderr": stderr}
    return result


@torch.no_grad()
def draw(net, n, cfg, autocast, device, generator, trajectory=False, given=None, labels=None):
    """n samples (n, H, W) of Algorithm 9 or the ODE solver (--sampler, --sample-steps, --final), in batches of
    --eval-batch-size; with trajectory, one batch and also the trajectory (theta and p_O at each step).
    given (n, H, W): known pixels (0 or 1; -1 where unknown). There p_O is replaced by the known value at every step,
    so that those pixels follow the Bayesian flow of their true values, the network sees them as it would in training,
    and it generates the rest consistently (inpainting); this works alike for every sampler.
    labels (n,): the class of each sample, for a --conditional network (with --guidance); None: unconditional."""
    size = 28 if cfg.digits == 1 else 64
    sampler = {"paper": discrete_sample, "ode": discrete_sample_ode, "sde": discrete_sample_sde}[cfg.sampler]
    chunks = [torch.arange(n)] if trajectory else torch.arange(n).split(cfg.eval_batch_size)
    progress = Progress(f"sampling ({cfg.sampler}, {cfg.sample_steps} steps)", len(chunks) * (cfg.sample_steps + 1))

    def run(idx):
        def probs_fn(theta, t):  # p_O(. | theta, t), counting the network calls for the progress line
            progress.tick()
            probs = guided_probs(net, theta, t, None if labels is None else labels[idx], cfg, autocast)
            if given is None:
                return probs
            known = given[idx]
            return torch.where(known[..., None] >= 0, F.one_hot(known.clamp_min(0), K).float(), probs)

        return sampler(probs_fn, (len(idx), size, size), cfg.sample_steps, cfg.beta_1, K, generator=generator,
                       device=device, return_trajectory=trajectory, final_mode=cfg.final == "mode")

    out = [run(idx) for idx in chunks]
    return out[0] if trajectory else torch.cat(out)


@torch.no_grad()
def sample(net, cfg, autocast, device, out_dir, tag=""):
    """Algorithm 9 (or the ODE solver): samples.png (a grid of final samples), evolution.png (theta and p_O of a
    black pixel at t = 0, 0.1, ..., 1) and evolution.gif (the same at every step, for 8 samples)."""
    from torchvision.utils import save_image
    g = torch.Generator(device).manual_seed(cfg.seed)
    labels, nrow = sample_labels(cfg, cfg.num_samples, device)
    x, trajectory = draw(net, len(labels) if labels is not None else cfg.num_samples, cfg, autocast, device, g,
                         trajectory=True, labels=labels)
    save_image(1 - x[:, None].float(), os.path.join(out_dir, f"samples{tag}.png"), nrow=nrow, pad_value=0.5)
    times = [k / 10 for k in range(11)]
    steps = [min(trajectory, key=lambda s: abs(s["t"] - tt)) for tt in times]
    rows = []
    for b in range(min(4, len(x))):
        rows += [s["input"][b, ..., 1] for s in steps] + [s["output"][b, ..., 1] for s in steps]
    grid = 1 - torch.stack(rows)[:, None]  # (8 x 11, 1, H, W): ink is black
    save_image(grid, os.path.join(out_dir, f"evolution{tag}.png"), nrow=len(times), pad_value=0.5)
    shown = min(8, len(x))  # evolution.gif: a frame per step, theta above p_O, then the samples
    frames = [1 - torch.cat([s["input"][:shown, ..., 1], s["output"][:shown, ..., 1]])[:, None] for s in trajectory]
    frames.append(1 - torch.cat([x[:shown], x[:shown]]).float()[:, None])
    save_gif(frames, shown, os.path.join(out_dir, f"evolution{tag}.gif"))


def sample_labels(cfg, n, device):
    """With --conditional: the class of each of about n samples, each --sample-class (every class for all) n / classes
    times (at least once) in turn, and the columns of a grid with one row per class. Unconditional: None and the
    columns of a square grid of n."""
    if not cfg.conditional:
        return None, max(1, round(math.sqrt(n)))
    classes = range(num_classes(cfg)) if "all" in cfg.sample_class else [int(c) for c in cfg.sample_class]
    each = max(1, n // len(classes))
    labels = torch.tensor(list(classes), device=device).repeat_interleave(each)
    return labels, each if each > 1 else max(1, round(math.sqrt(len(labels))))


INPAINT_REGIONS = ("top", "bottom", "left", "right", "centre")


def inpaint_mask(cfg, size, device):
    """--inpaint: (H, W) bool, True where pixels are generated: a half (top, bottom, left, right), the centre (the
    middle half each way), or the white pixels of a mask image of H x W pixels."""
    h, q = size // 2, size // 4
    regions = {"top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None)),
               "left": (slice(None), slice(0, h)), "right": (slice(None), slice(h, None)),
               "centre": (slice(q, size - q), slice(q, size - q))}
    if cfg.inpaint in regions:
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[regions[cfg.inpaint]] = True
        return mask.to(device)
    from PIL import Image
    image = Image.open(cfg.inpaint).convert("L")
    if image.size != (size, size):
        raise SystemExit(f"{SCRIPT}: error: --inpaint {cfg.inpaint} is {image.size[0]}x{image.size[1]} pixels; the "
                         f"images are {size}x{size}")
    return (torch.tensor(list(image.getdata())).view(size, size) >= 128).to(device)


@torch.no_grad()
def complete(net, data, cfg, ctx, tag=""):
    """--inpaint: the first --num-samples test images completed with the region missing; inpaint.png shows, for each,
    the known pixels (the missing region grey), the completion and the original. For single digits the log gives the
    fraction of completions that the sample-quality classifier labels as the original's digit."""
    if not cfg.inpaint:
        return
    size, n = data["test"].shape[-1], cfg.num_samples
    missing = inpaint_mask(cfg, size, ctx.device)
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 2)
    original = binarise(data["test"][:n], g)
    x = draw(net, n, cfg, ctx.autocast, ctx.device, g, given=torch.where(missing, -1, original))
    from torchvision.utils import save_image
    shown = torch.where(missing, 0.5, 1 - original.float())  # (n, H, W): ink black, missing grey
    rows = torch.stack([shown, 1 - x.float(), 1 - original.float()], 1).flatten(0, 1)[:, None]  # (3n, 1, H, W)
    save_image(rows, os.path.join(cfg.out_dir, f"inpaint{tag}.png"), nrow=3 * max(1, round(math.sqrt(n) / 2)),
               pad_value=0.5)
    line = f"inpainting ({cfg.inpaint}, {cfg.sampler}, {cfg.sample_steps} steps): {n} test images completed"
    if cfg.digits == 1:
        clf, labels = train_classifier(cfg, ctx), load_mnist_labels(cfg.data_dir)["test"][:n].to(ctx.device)
        right = (clf(x).argmax(-1) == labels).float().mean().item()
        line += f", {right:.1%} of them labelled as the original's digit (the originals: " \
                f"{(clf(original).argmax(-1) == labels).float().mean().item():.1%})"
    ctx.log(line)


def save_gif(frames, nrow, path, max_frames=100):
    """An animated GIF of image grids, at most max_frames of them evenly spaced (the last one kept, and held):
    frames: a list of (N, C, H, W) in [0, 1]."""
    from PIL import Image
    from torchvision.utils import make_grid
    keep = sorted({round(k * (len(frames) - 1) / (max_frames - 1)) for k in range(max_frames)}) \
        if len(frames) > max_frames else range(len(frames))
    images = [Image.fromarray((make_grid(frames[k].float().cpu(), nrow=nrow, pad_value=0.5).clamp(0, 1) * 255)
                              .round().byte().permute(1, 2, 0).numpy()) for k in keep]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[80] * (len(images) - 1) + [2000],
                   loop=0)


# ----------------------------------------------------------------------------------------------------------------------
# Sample quality (--eval-samples): a small digit classifier, trained on the training split the first time it is needed
# and cached next to the data; from it, how digit-like and how varied the samples are.

class Classifier(nn.Module):
    """A small CNN for binarised 28x28 digits: (B, 28, 28) -> 10 logits; features(): the 128 penultimate features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):  # (B, 28, 28) -> (B, 10)
        return self.head(self.features(x[:, None].float()))


def train_classifier(cfg, ctx, epochs=2):
    """The classifier for this MNIST folder: loaded from DATA/MNIST/classifier-CRC.pt, or trained (Adam, two epochs of
    dynamically binarised training digits, ≈1-2 minutes on 2 CPU cores) and saved there. CRC: of the training
    images and labels, so other data gets another classifier."""
    mnist, labels = load_mnist(cfg.data_dir), load_mnist_labels(cfg.data_dir)
    crc = zlib.crc32(labels["train"].numpy().tobytes(), zlib.crc32(mnist["train"].numpy().tobytes()))
    path = os.path.join(cfg.data_dir, "MNIST", f"classifier-{crc:08x}.pt")
    clf = Classifier().to(ctx.device)
    if os.path.exists(path):
        clf.load_state_dict(torch.load(path, map_location=ctx.device, weights_only=True))
        return clf.eval()
    ctx.log(f"training the sample-quality classifier on {len(labels['train']):,} training digits (once; cached as "
            f"{path})")
    g = torch.Generator().manual_seed(0)
    images, targets = mnist["train"].to(ctx.device), labels["train"].long().to(ctx.device)
    optimizer = torch.optim.Adam(clf.parameters(), lr=1e-3)
    with torch.enable_grad():  # also when called from inside sampling code
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=g).split(128):
                loss = F.cross_entropy(clf(binarise(images[idx.to(ctx.device)])), targets[idx.to(ctx.device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    clf.eval()
    with torch.no_grad():
        test = torch.cat([clf(binarise(x)).argmax(-1) for x in mnist["test"].to(ctx.device).split(1000)])
    accuracy = (test.cpu() == labels["test"].long()).float().mean().item()
    ctx.log(f"sample-quality classifier: {accuracy:.2%} of binarised test digits right")
    try:
        torch.save(clf.state_dict(), path)
    except OSError as e:
        ctx.log(f"warning: could not cache the classifier at {path} ({e}); it will be trained again next time")
    return clf


def digit_crops(x):
    """The two digits of 64x64 two-digit images, each a 28x28 crop centred on the ink of its half: (B, 64, 64) ->
    (2, B, 28, 28)."""
    crops = []
    for half in (x[:, :, :32], x[:, :, 32:]):
        ink = half.float() + 1e-6  # (B, 64, 32)
        rows = (ink.sum(2) * torch.arange(64, device=x.device)).sum(1) / ink.sum((1, 2))  # centre of mass
        cols = (ink.sum(1) * torch.arange(32, device=x.device)).sum(1) / ink.sum((1, 2))
        padded = F.pad(half, (14, 14, 14, 14))  # (B, 92, 60): every crop fits
        top, left = rows.round().long().clamp(0, 63), cols.round().long().clamp(0, 31)
        crops.append(torch.stack([padded[b, top[b]:top[b] + 28, left[b]:left[b] + 28] for b in range(len(x))]))
    return torch.stack(crops)


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):
    |m_a - m_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


@torch.no_grad()
def image_figures(clf, x):
    """Features (N, D), labels (N,) and {the fraction labelled with probability > 0.9, the entropy of the label
    histogram (bits)} of binarised images x (N, H, W); two-digit images count as confident when both digits are, and
    their label is the number 00-99."""
    if x.shape[-1] == 64:
        parts = [[clf(c) for c in crop.split(500)] for crop in digit_crops(x)]
        logits = [torch.cat(p) for p in parts]  # 2 x (N, 10)
        feats = torch.cat([torch.cat([clf.features(c[:, None].float()) for c in crop.split(500)])
                           for crop in digit_crops(x)], 1)
        confident = torch.stack([lg.softmax(-1).amax(-1) > 0.9 for lg in logits]).all(0)
        labels, classes = 10 * logits[0].argmax(-1) + logits[1].argmax(-1), 100
    else:
        logits = torch.cat([clf(c) for c in x.split(500)])
        feats = torch.cat([clf.features(c[:, None].float()) for c in x.split(500)])
        confident, labels, classes = logits.softmax(-1).amax(-1) > 0.9, logits.argmax(-1), 10
    p = torch.bincount(labels, minlength=classes).double() / len(labels)
    entropy = -(p[p > 0] * p[p > 0].log2()).sum().item()
    return feats, labels, {"confident": confident.float().mean().item(), "label_entropy_bits": entropy}


def sample_quality(net, data, cfg, ctx):
    """--eval-samples N: N samples (the --sampler at --sample-steps) against N test images, and N test images against
    N others as the floor: the Fréchet distance of the classifier's features, the confident fraction and the label
    entropy. With --conditional: samples of each --sample-class in equal numbers, against as many test images of
    each class, and also the accuracy (the fraction labelled as the requested class; for --digits 2, both digits
    right, and each digit alone in accuracy_tens and accuracy_units), the Fréchet distance within each class
    (frechet_by_class) and the diversity (within each class, the total variance of the features over that of the
    test images, averaged: 1 is as varied as real data)."""
    n = cfg.eval_samples
    labels, _ = sample_labels(cfg, n, ctx.device)
    if labels is None:
        if 2 * n > len(data["test"]):
            raise SystemExit(f"{SCRIPT}: error: --eval-samples {n} needs twice as many test images; the test split "
                             f"has {len(data['test'])}")
        reference, other = torch.arange(n), torch.arange(n, 2 * n)
    else:  # for each class in turn, its first m test images as the reference and the next m as the floor
        reference, other = [], []
        for c, m in zip(*labels.unique_consecutive(return_counts=True)):
            idx = (data["test_labels"] == c).nonzero()[:, 0].cpu()
            if 2 * m > len(idx):
                raise SystemExit(f"{SCRIPT}: error: --eval-samples {n} needs {2 * m} test images of class {c}; the "
                                 f"test split has {len(idx)}")
            reference, other = reference + [idx[:m]], other + [idx[m:2 * m]]
        reference, other = torch.cat(reference), torch.cat(other)
    clf = train_classifier(cfg, ctx)
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 1)
    start = time.time()
    x = draw(net, len(reference), cfg, ctx.autocast, ctx.device, g, labels=labels)
    seconds = time.time() - start
    test = binarise(data["test"][torch.cat([reference, other]).to(ctx.device)], g)
    f_samples, l_samples, samples = image_figures(clf, x)
    f_test, l_test, test_figures = image_figures(clf, test[:len(reference)])
    f_other, _, _ = image_figures(clf, test[len(reference):])
    samples["frechet"] = frechet_distance(f_samples, f_test)
    test_figures["frechet"] = frechet_distance(f_other, f_test)
    if labels is not None:
        for figures, found in ((samples, l_samples), (test_figures, l_test)):
            figures["accuracy"] = (found == labels).float().mean().item()
            if cfg.digits == 2:  # each digit on its own: the tens (left) and the units (right)
                figures["accuracy_tens"] = (found // 10 == labels // 10).float().mean().item()
                figures["accuracy_units"] = (found % 10 == labels % 10).float().mean().item()
        spread = lambda f: torch.cov(f.double().T).trace()  # noqa: E731  the total variance of features (M, D)
        classes = [c for c in labels.unique().tolist() if (labels == c).sum() > 1]
        for figures, f in ((samples, f_samples), (test_figures, f_other)):
            figures["frechet_by_class"] = {str(c): frechet_distance(f[labels == c], f_test[labels == c])
                                           for c in classes}
            figures["diversity"] = sum(spread(f[labels == c]) / spread(f_test[labels == c]) for c in classes).item() \
                / max(1, len(classes))
    return {"samples": samples, "test": test_figures, "seconds": seconds}


# ----------------------------------------------------------------------------------------------------------------------
# Training: setup -> build -> resume -> the loop. DDP when launched by torchrun; rank 0 logs, evaluates, samples and
# writes files. This section is the same in every script.

PREEMPTED = 75  # exit code after a preemption signal: the checkpoint is saved, resume with --resume (EX_TEMPFAIL)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # what cluster schedulers send before a kill


@dataclass
class Context:
    """Where this process runs: device, autocast, its rank among `world` processes, and the run's log file."""
    device: torch.device
    autocast: torch.autocast
    rank: int
    world: int
    out_dir: str

    @property
    def ddp(self):
        """Launched by torchrun with more than one process."""
        return self.world > 1

    @property
    def master(self):
        """Rank 0: the process that logs, evaluates, samples and writes files."""
        return self.rank == 0

    def log(self, line):
        """Print and append to log.txt, on rank 0 only."""
        if self.master:
            print(line, flush=True)
            with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")


def keep_freed_memory():
    """glibc hands large freed blocks back to the system at once, so every training step faults its activations back
    into memory (measured on the MNIST quick preset: 22,000 page faults and 8% of the CPU time per step, 10% fewer
    examples/s). Keep freed memory in the process instead: allocations up to 32 MB come from the heap, which is never
    trimmed below 1 GB. Returns whether it applied (only with glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # macOS, Windows, musl: their allocators differ, nothing to do
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameters, from glibc's malloc.h
    return all([libc.mallopt(M_MMAP_THRESHOLD, 32 << 20), libc.mallopt(M_TRIM_THRESHOLD, 1 << 30),
                libc.mallopt(M_TOP_PAD, 256 << 20)])


def setup(cfg):
    """Process group (under torchrun), device, autocast dtype, run directory, memory allocator -> Context."""
    keep_freed_memory()
    rank, local_rank, world = 0, 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        on_gpu = torch.cuda.is_available() and (cfg.device == "auto" or cfg.device.startswith("cuda"))
        backend = "nccl" if on_gpu else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))  # the others wait while rank 0 evaluates
        rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = cfg.device
    if device == "auto":
        device = "mps" if torch.backends.mps.is_available() else "cpu"
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else device
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    os.makedirs(cfg.out_dir, exist_ok=True)
    return Context(device, autocast, rank, world, cfg.out_dir)


def build(cfg, device):
    """The network, its EMA copy (evaluation and sampling) and AdamW, with weight decay on weights only."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = UNet(cfg.channels, (1, 2, 2), cfg.res_blocks, cfg.dropout, num_classes(cfg)).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # not biases, norms, positions
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return model, ema, torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def fingerprint(data):
    """The identity of a dataset: each split's shape and a CRC-32 of all its bytes ('test 10000x28x28, ...')."""
    crc = 0
    for split in sorted(data):
        crc = zlib.crc32(data[split].cpu().contiguous().numpy().tobytes(), crc)
    shapes = ", ".join(f"{split} {'x'.join(map(str, data[split].shape))}" for split in sorted(data))
    return f"{shapes}, crc32 {crc:08x}"


def save_checkpoint(path, state):
    """Write to a temporary file, keep the previous checkpoint as ckpt-prev.pt, then rename: a crash or a full disk
    mid-write never leaves the run without a readable checkpoint."""
    try:
        torch.save(state, path + ".tmp")
        if os.path.exists(path):
            os.replace(path, os.path.join(os.path.dirname(path), "ckpt-prev.pt"))
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as either
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise SystemExit(f"{SCRIPT}: error: writing the checkpoint {path} failed ({e}); stopping. The last good "
                         f"checkpoint is still in {os.path.dirname(path) or '.'}")


def load_checkpoint(ctx):
    """<out-dir>/ckpt.pt, or ckpt-prev.pt (saying so) if ckpt.pt is missing or unreadable. weights_only: loading a
    checkpoint never runs code from it."""
    for name in ("ckpt.pt", "ckpt-prev.pt"):
        path = os.path.join(ctx.out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            ckpt = torch.load(path, map_location=ctx.device, weights_only=True)
            if not isinstance(ckpt, dict) or not {"model", "ema", "optimizer", "step", "config"} <= set(ckpt):
                raise ValueError("not a checkpoint written by this script")
            if name != "ckpt.pt":
                ctx.log(f"using the previous checkpoint {path}")
            return ckpt
        except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
            ctx.log(f"warning: {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    raise SystemExit(f"{SCRIPT}: error: no checkpoint in {ctx.out_dir} (ckpt.pt or ckpt-prev.pt) to resume, evaluate "
                     f"or sample from")


def check_config(cfg, saved, ctx, source, log_changes=True):
    """Stop, naming each flag, if a setting that fixes the model or the data differs from the checkpoint's (`source`
    names it); log the other differences (steps, intervals, evaluation, sampling, device, ...), which are safe."""
    now = dataclasses.asdict(cfg)
    fixed = {f.name for f in dataclasses.fields(Config) if f.metadata["fixed"]}
    modes = {"preset", "resume", "eval_only", "sample_only", "init_from"}

    def as_now(k):  # the checkpoint's value in this version's type (it may hold one value where a list is allowed)
        if isinstance(now[k], tuple):
            return tuple(saved[k]) if isinstance(saved[k], (list, tuple)) else (saved[k],)
        return type(now[k])(saved[k])

    differ = [k for k in now if k not in modes and k in saved and now[k] != as_now(k)]
    if any(k in fixed for k in differ):
        changes = [f"{as_flag(k, saved[k])} in the checkpoint, {flag_value(now[k])} now" for k in differ if k in fixed]
        raise SystemExit(f"{SCRIPT}: error: {source} was made with other model or data settings: "
                         f"{'; '.join(changes)}. Give the checkpoint's values")
    if differ and log_changes:
        changes = [f"{as_flag(k, saved[k])} -> {flag_value(now[k])}" for k in differ]
        ctx.log("changed since the checkpoint: " + ", ".join(changes))


def resume(cfg, ctx, model, ema, optimizer, data_id):
    """Load the checkpoint in --out-dir into model, EMA and optimiser after checking its settings. Returns its step."""
    ckpt = load_checkpoint(ctx)
    check_config(cfg, ckpt["config"], ctx, f"the checkpoint in {ctx.out_dir} (use another --out-dir for a new run)")
    if ckpt.get("data") != data_id:
        message = f"the checkpoint was trained on other data ({ckpt.get('data')}; now {data_id})"
        if cfg.resume:
            raise SystemExit(f"{SCRIPT}: error: {message}. Resume on the same data, or use another --out-dir")
        ctx.log(f"note: {message}")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def learning_rate(step, cfg):
    """The learning rate of optimiser step `step` (0-based): linear warm-up over --lr-warmup steps, then constant
    (the paper's) or a cosine or linear decay to --lr-final x --lr at --steps."""
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    progress = min(1.0, (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup))
    shape = {"none": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.lr_decay]
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * shape) if cfg.lr_decay != "none" else cfg.lr


def check_shapes(state, model, source):
    """Stop with one line at the first tensor of `state` whose name or shape does not fit `model`."""
    own = model.state_dict()
    for name in sorted(set(own) | set(state)):
        if name not in state or name not in own or state[name].shape != own[name].shape:
            have = tuple(state[name].shape) if name in state else "missing"
            want = tuple(own[name].shape) if name in own else "not in this network"
            raise SystemExit(f"{SCRIPT}: error: {source} does not fit this network: tensor {name} is {have} there, "
                             f"{want} here. Give the network flags ({NETWORK_FLAGS}) of the run that wrote it")


def load_weights(cfg, ctx, model, ema):
    """--init-from: the model and EMA weights of another run's checkpoint; the optimiser and the step count start
    afresh. Its network settings must be the flags' (checked as for --resume)."""
    path = cfg.init_from
    try:
        ckpt = torch.load(path, map_location=ctx.device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{SCRIPT}: error: --init-from {path}: no such file")
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise SystemExit(f"{SCRIPT}: error: --init-from {path} is unreadable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})")
    if isinstance(ckpt, dict) and any(str(k).startswith("net.") for k in ckpt):  # the authors' release
        state = from_authors(ckpt)
        check_shapes(state, model, path)
        model.load_state_dict(state)
        ema.load_state_dict(state)
        ctx.log(f"weights from {path} (the authors' layout, into the model and its EMA); the optimiser and the step "
                f"count start afresh")
        return
    if not isinstance(ckpt, dict) or not {"model", "ema", "config"} <= set(ckpt):
        raise SystemExit(f"{SCRIPT}: error: --init-from {path} is neither a checkpoint written by {SCRIPT} nor one of "
                         f"the authors' release (a state_dict of net.* tensors)")
    check_config(cfg, ckpt["config"], ctx, f"--init-from {path}", log_changes=False)
    for key in ("model", "ema"):
        check_shapes(ckpt[key], model, path)
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    ctx.log(f"weights from {path} (its step {ckpt.get('step')}); the optimiser and the step count start afresh")


def peak_memory_mb(device):
    """Peak GPU memory allocated, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_eval(ema, data, split, step, cfg, ctx):
    """Evaluate the EMA network on a split, log the bound for each n and write eval.json."""
    examples = evaluation_set(data[split], cfg)
    result = evaluate(ema, examples, cfg, ctx.autocast, seed=hash((cfg.seed, -1, step)) % 2 ** 62)
    bounds = [f"L^{n}+L^r {r['total']:.3f} ± {r['stderr']:.3f} (L^r {r['recon']:.3f})" for n, r in result.items()]
    ctx.log(f"eval {split} step {step} | " + " | ".join(bounds) + f" {UNIT}")
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"step": step, "split": split, "unit": UNIT, "examples": len(examples), "repeats": cfg.eval_repeats,
                   "n": result}, f, indent=1)


def sample_all(ema, data, cfg, ctx, quality):
    """Sample with every combination of --sampler, --sample-steps and the script's other swept settings: its grids
    (samples.png, evolution.png; samples-SAMPLER-STEPS.png and so on when there are several, with -gW for --guidance W
    when there are several weights), complete()'s conditional samples (--inpaint, --prompt, --infill) and, with
    quality (--eval-samples N), its sample quality: the figures of sample_quality for N samples and for real test
    data, logged, and a table of every combination (sampler, steps, the swept settings, network calls, seconds to
    draw the N samples, figures) in samples.json and in eval.json under "samples"."""
    table, settings = [], {k: getattr(cfg, k) for k in swept(cfg)}  # {name: its values}
    runs = [dict(zip(settings, values)) for values in itertools.product(*settings.values())]
    for run in runs:
        one = dataclasses.replace(cfg, **run)
        extra = {k: v for k, v in run.items() if k not in ("sampler", "sample_steps")}  # e.g. guidance
        tag = "" if len(runs) == 1 else f"-{one.sampler}-{one.sample_steps}" + "".join(
            f"-{k[0]}{v:g}" for k, v in extra.items() if len(settings[k]) > 1)
        sample(ema, one, ctx.autocast, ctx.device, cfg.out_dir, tag)
        complete(ema, data, one, ctx, tag)
        if quality:
            figures = sample_quality(ema, data, one, ctx)
            table.append(dict(sampler=one.sampler, steps=one.sample_steps, **extra, network_calls=one.sample_steps + 1,
                              examples=cfg.eval_samples, seconds=round(figures.pop("seconds"), 1), **figures))
            show = lambda d: ", ".join(f"{k} {v:.4g}" for k, v in d.items() if isinstance(v, float))  # noqa: E731
            shown = "".join(f", {k} {v:g}" for k, v in extra.items())
            ctx.log(f"sample quality ({one.sampler}, {one.sample_steps} steps{shown}, {cfg.eval_samples} samples, "
                    f"{table[-1]['seconds']} s) | samples: {show(figures['samples'])} | test data: "
                    f"{show(figures['test'])}")
    if quality:
        with open(os.path.join(cfg.out_dir, "samples.json"), "w") as f:
            json.dump(table, f, indent=1)
        path = os.path.join(cfg.out_dir, "eval.json")
        result = json.load(open(path)) if os.path.exists(path) else {}
        result["samples"] = table
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def cpu_notice(cfg, ctx, model, data):
    """On a CPU (or MPS) with no --preset and the paper-size model: one line with the measured cost of a step."""
    paper = Config()
    if ctx.device.type not in ("cpu", "mps") or cfg.preset or cfg.steps == 0 or any(
            getattr(cfg, f.name) != getattr(paper, f.name) for f in dataclasses.fields(Config) if f.metadata["fixed"]):
        return
    t0 = time.time()
    train_loss(model, get_batch(data, dataclasses.replace(cfg, batch_size=2)), cfg, ctx.autocast).mean().backward()
    model.zero_grad(set_to_none=True)
    step_seconds = (time.time() - t0) * cfg.batch_size / 2 * cfg.grad_accum
    total = cfg.steps * step_seconds
    total = f"{total / 3600:.0f} h" if total >= 3600 else f"{total / 60:.0f} min" if total >= 60 else f"{total:.0f} s"
    ctx.log(f"notice: the paper-size model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch "
            f"{cfg.batch_size} x {cfg.grad_accum}) on {ctx.device.type}: ≈{step_seconds:.0f} s per step (timed on 2 "
            f"examples), ≈{total} for {cfg.steps} steps; --preset quick runs a small model in minutes")


@contextlib.contextmanager
def preemption_signals():
    """Within: SIGTERM, SIGINT and SIGUSR1 are recorded in the yielded list instead of ending the process."""
    received = []
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set from the main thread
        yield received
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in PREEMPTION_SIGNALS}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(cfg, ctx, data, model, ema, optimizer, step, data_id):
    """The training loop from `step` to --steps: batch, L^inf, backward, clip, AdamW, EMA, log, checkpoint, evaluate.
    Returns the final step."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.ddp else model
    if cfg.compile:
        net = torch.compile(net)
    loss_sum, last_step, logged = torch.zeros((), device=ctx.device), step, False
    t_start = t_last = time.time()
    with preemption_signals() as received:
        while step < cfg.steps:
            torch.manual_seed(hash((cfg.seed, ctx.rank, step)) % 2 ** 62)  # batch, t, noise: from seed, rank, step
            model.train()
            step_loss = torch.zeros((), device=ctx.device)
            for micro in range(cfg.grad_accum):
                batch = get_batch(data, cfg)
                last_micro = micro == cfg.grad_accum - 1
                with net.no_sync() if ctx.ddp and not last_micro else contextlib.nullcontext():
                    loss = train_loss(net, batch, cfg, ctx.autocast).mean() / cfg.grad_accum
                    loss.backward()
                step_loss += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            # one host sync per step, agreed by all processes: a non-finite loss, a preemption signal, a log line due
            early = not logged and (step + 1 - last_step >= 10 or time.time() - t_start > 5)  # a first ETA soon
            log_due = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or early
            flags = torch.tensor([float(not (torch.isfinite(step_loss) and torch.isfinite(grad_norm))),
                                  float(len(received) > 0), float(log_due)], device=ctx.device)
            if ctx.ddp:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            non_finite, preempted, log_due = flags.tolist()
            if non_finite:
                ctx.log(f"non-finite loss or gradient at step {step + 1} (loss {step_loss.item()}, grad norm "
                        f"{grad_norm.item()}): stopping; the last good checkpoint {ckpt_path} is untouched")
                raise SystemExit(f"{SCRIPT}: error: non-finite loss at step {step + 1}")
            loss_sum += step_loss
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            with torch.no_grad():  # EMA with warm-up: the effective decay grows towards --ema-decay
                ema_decay = min(cfg.ema_decay, (1 + step) / (10 + step))
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - ema_decay)
            if log_due:
                if ctx.ddp:  # the mean over all processes, not rank 0's batches alone
                    dist.all_reduce(loss_sum)
                    loss_sum /= ctx.world
                seconds, steps_done = time.time() - t_last, step - last_step
                loss = to_unit(loss_sum.item() / steps_done, cfg)
                examples_per_s = steps_done * cfg.batch_size * cfg.grad_accum * ctx.world / seconds
                ms_per_step = 1000 * seconds / steps_done
                eta_min = (cfg.steps - step) * seconds / steps_done / 60
                ctx.log(f"step {step} | loss {loss:.4g} {UNIT} | grad norm {grad_norm.item():.3g} | lr {lr:.3g} | "
                        f"{examples_per_s:.1f} examples/s | {ms_per_step:.0f} ms/step | "
                        f"peak mem {peak_memory_mb(ctx.device):.0f} MB | ETA {eta_min:.1f} min")
                loss_sum.zero_()
                t_last, last_step, logged = time.time(), step, True
            if ctx.master and (step % cfg.ckpt_every == 0 or step == cfg.steps or preempted):
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "step": step,
                                            "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg),
                                            "data": data_id})
            if preempted:
                name = signal.Signals(received[0]).name if received else "a signal on another process"
                ctx.log(f"preempted by {name} after step {step}: checkpoint {ckpt_path} written; continue with the "
                        f"same command and --resume")
                raise SystemExit(PREEMPTED)
            t_side = time.time()  # evaluation and sampling time is left out of examples/s
            if ctx.master and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                run_eval(ema, data, "val", step, cfg, ctx)
            if ctx.master and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                sample_all(ema, data, cfg, ctx, quality=False)
            t_last += time.time() - t_side
    return step


def main(argv=None):
    """Parse the flags, then train (or only evaluate, or only sample) in the run directory."""
    cfg = parse_args(argv)
    ctx = setup(cfg)
    try:
        data = load_data(cfg, ctx.device)
        data_id = fingerprint(data)
        model, ema, optimizer = build(cfg, ctx.device)
        step = 0
        if cfg.init_from:
            load_weights(cfg, ctx, model, ema)
        elif cfg.resume or cfg.eval_only or cfg.sample_only:
            step = resume(cfg, ctx, model, ema, optimizer, data_id)
        overrides = " ".join(preset_overrides(cfg)) or "none"
        ctx.log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        ctx.log(f"preset {cfg.preset or 'paper (none given)'}, flags that differ from it: {overrides}")
        ctx.log(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | device {ctx.device} | "
                f"processes {ctx.world} | data {data_id} | step {step}")
        if cfg.eval_only or cfg.sample_only:
            if ctx.master and cfg.eval_only:
                run_eval(ema, data, "test", step, cfg, ctx)
            if ctx.master and (cfg.sample_only or cfg.eval_samples):
                sample_all(ema, data, cfg, ctx, quality=cfg.eval_samples > 0)
            return
        cpu_notice(cfg, ctx, model, data)
        step = train(cfg, ctx, data, model, ema, optimizer, step, data_id)
        if ctx.master:
            run_eval(ema, data, "test", step, cfg, ctx)
            sample_all(ema, data, cfg, ctx, quality=cfg.eval_samples > 0)
            ctx.log(f"done: {cfg.out_dir}")
        if ctx.ddp:
            dist.barrier()  # the other processes wait for rank 0's evaluation and samples
    except torch.cuda.OutOfMemoryError as e:
        in_use = torch.cuda.memory_allocated(ctx.device) / 2 ** 30 if ctx.device.type == "cuda" else float("nan")
        cause = f"{SCRIPT}: error: out of memory on {ctx.device} ({in_use:.1f} GiB allocated; " \
                f"{str(e).splitlines()[0]}). Lower --batch-size {cfg.batch_size} (raise --grad-accum " \
                f"{cfg.grad_accum} to keep the global batch) or --eval-batch-size {cfg.eval_batch_size}"
        ctx.log(cause)
        raise SystemExit(cause)
    except BaseException as e:  # under torchrun: say which process failed and why, in the run's log, then end
        if ctx.ddp and not (isinstance(e, SystemExit) and e.code in (0, None, PREEMPTED)):
            line = f"process {ctx.rank} of {ctx.world} stopped: {type(e).__name__}: {e}"
            print(line, file=sys.stderr, flush=True)
            with open(os.path.join(cfg.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")
        raise
    finally:
        if ctx.ddp and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
