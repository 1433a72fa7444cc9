"""Bayesian Flow Network on dynamically binarised MNIST (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 2.

Trains the authors' U-Net with the continuous-time loss L^inf (Algorithm 8), evaluates the test bound L^n + L^r in
nats/image (the paper: 77.87 in continuous time) and samples with Algorithm 9, or the ODE or SDE solver of common.py.
Writes log.txt, ckpt.pt, eval.json, samples.png and .pt, and evolution.png/.gif (theta and p_O over time) to --out-dir.

    python bfn_mnist.py --preset quick                                # a small U-Net, minutes on a laptop CPU
    python bfn_mnist.py                                               # the paper's model and optimiser
    torchrun --nproc_per_node=8 bfn_mnist.py --batch-size 64          # the paper's global batch on 8 GPUs
    python bfn_mnist.py --eval-only --eval-n inf 10 25 50 100 784     # the paper's table, from the run directory
    python bfn_mnist.py --sample-only --sampler ode --sample-steps 10 --num-samples 500
    python bfn_mnist.py --preset quick --digits 2 --steps 960         # 64x64 images of two digits side by side

Sampling a trained model beyond the paper (inpainting, guidance) is in beyond/, one command per feature.
Shapes: B batch, H x W image (28 x 28; 64 x 64 with --digits 2), K = 2 classes (0 white, 1 black ink), C channels.
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import gzip
import json
import math
import os
import resource
import shlex
import shutil
import signal
import struct
import sys
import time
import types

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

import common

SCRIPT = "bfn_mnist.py"
UNIT = "nats/image"
K = 2  # the classes of a pixel: 0 white, 1 black ink
ADAMW_BETAS = (0.9, 0.98)
TIME_DRAWS = ("uniform", "stratified")  # of t in a training batch: the paper's, or one t per stratum (beyond)


def error(message):
    """The exception that stops the script with one line: "SCRIPT: error: message" (exit status 1)."""
    return SystemExit(f"{SCRIPT}: error: {message}")


def setting(default, help=None, choices=None, low=None, fixed=False):
    """A Config field: default, --help (None: presets only), choices, bound (int >= low, float > low), fixed (kept)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "low": low, "fixed": fixed})


@dataclasses.dataclass
class Config:
    """Every setting of a run; each with help is a flag (--batch-size for batch_size). The defaults are the paper's."""

    data_dir: str = setting("data", "where MNIST is, or is downloaded to (torchvision's layout: DIR/MNIST/raw)")
    digits: int = setting(1, "1: 28x28 MNIST; 2: 64x64 images of two digits side by side", (1, 2), fixed=True)
    conditional: bool = setting(False, "a class-conditional network: it also sees the digit (or number)", fixed=True)
    beta_1: float = setting(
        9.0, "final accuracy beta(1) of the schedule beta(t) = beta(1) t^2 (§6.8)", low=0.0, fixed=True
    )
    channels: int = setting(128, "U-Net base channels (a multiple of 8)", low=8, fixed=True)
    res_blocks: int = setting(2, "residual blocks per U-Net level", low=1, fixed=True)
    steps: int = setting(100_000, "optimiser steps to train (the total, also when resuming)", low=1)
    batch_size: int = setting(512, "images per process and step, also of evaluation and sampling", low=1)
    grad_accum: int = setting(1, "batches accumulated per optimiser step", low=1)
    lr: float = setting(1e-4, "AdamW learning rate (the peak, with the quick preset's schedule)", low=0.0)
    t_draw: str = setting("uniform", "t of a training batch: each alone, or one per 1/B of [0, 1]", TIME_DRAWS)
    eval_n: tuple = setting(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = setting(0, "evaluate on the first N test images (0: all)", low=0)
    eval_repeats: int = setting(1, "passes over them with fresh binarisations and noise", low=1)
    sampler: str = setting("paper", "Algorithm 9, or the second-order ODE or SDE solver", ("paper", "ode", "sde"))
    sample_steps: int = setting(100, "generation steps n", low=1)
    num_samples: int = setting(64, "images to sample (with --conditional: about as many, a row per class)", low=1)
    preset: str = setting("paper", "the paper's settings, or a small CPU recipe; flags given win", ("paper", "quick"))
    out_dir: str = setting("runs/bfn_mnist", "the run directory")
    resume: bool = setting(False, "continue from <out-dir>/ckpt.pt with its settings (flags given change them)")
    init_from: str = setting("", "start from the weights of another run's ckpt.pt or an authors' checkpoint")
    eval_only: bool = setting(False, "evaluate the checkpoint in <out-dir> on the test set")
    sample_only: bool = setting(False, "sample from the checkpoint in <out-dir>")
    seed: int = setting(0, "everything random derives from it")
    device: str = setting("auto", "auto (cuda, mps or cpu), cpu, cuda (this process's GPU), cuda:N or mps")
    compile: bool = setting(False, "torch.compile the network for training")
    log_every: int = setting(100, "steps between log lines", low=1)
    dropout: float = setting(0.5)  # in the residual blocks
    lr_warmup: int = setting(0)  # steps of linear learning-rate warm-up (the paper: none)
    lr_decay: str = setting("none")  # "cosine": down to 0.1 --lr at --steps (the paper: constant)


QUICK_NETWORK = {"channels": 32, "res_blocks": 1, "dropout": 0.0}
QUICK_TRAINING = {"lr": 1e-3, "lr_warmup": 100, "lr_decay": "cosine", "batch_size": 32, "steps": 1600}
PRESETS = {"paper": {}, "quick": QUICK_NETWORK | QUICK_TRAINING | {"eval_examples": 2000}}
GROUPS = 32  # GroupNorm groups at most (the authors')


def check(cfg):
    """Stop with one line at the first problem with the settings."""
    for field in dataclasses.fields(Config):
        value = getattr(cfg, field.name)
        low = field.metadata["low"]
        if field.type is int and low is not None and value < low:
            raise error(f"--{field.name.replace('_', '-')} must be at least {low}, got {value}")
        if field.type is float and low is not None and not value > low:
            raise error(f"--{field.name.replace('_', '-')} must be more than {low:g}, got {value}")
    if any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n):
        raise error(f"--eval-n takes inf or positive integers, got {' '.join(cfg.eval_n)}")
    if cfg.eval_only and cfg.sample_only:
        raise error("--eval-only and --sample-only exclude each other")
    if cfg.resume and cfg.init_from:
        raise error("--resume and --init-from exclude each other")
    if cfg.channels % 8:
        raise error(f"--channels must be a multiple of 8, got {cfg.channels}")
    if cfg.conditional and GROUPS % (2 * cfg.channels) == 0:
        raise error(f"--conditional needs more --channels: a level with more than {GROUPS} GroupNorm groups")


def parse_flags(argv=None):
    """The command line -> {setting: value} of the flags given. --help shows each default, and the quick preset's."""
    parser = argparse.ArgumentParser(SCRIPT, description=__doc__.splitlines()[0], argument_default=argparse.SUPPRESS)
    for field in dataclasses.fields(Config):
        help = field.metadata["help"]
        if help is None:
            continue  # set by the presets only
        if field.default not in ("", False):
            help += f" (default: {' '.join(field.default) if field.type is tuple else field.default})"
        if PRESETS["quick"].get(field.name, field.default) != field.default:
            help += f" (--preset quick: {PRESETS['quick'][field.name]})"
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action="store_true", help=help)
        elif field.type is tuple:
            parser.add_argument(flag, nargs="+", help=help)
        else:
            parser.add_argument(flag, type=field.type, choices=field.metadata["choices"], help=help)
    given = vars(parser.parse_args(argv))
    return {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Data: MNIST as uint8 tensors on the device; every read draws a fresh binarisation.

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's first source
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_DIMS = {2051: 3, 2049: 1}  # the magic number of an idx file -> its number of dimensions: images, labels


def read_idx(path):
    """An MNIST idx file (gzip's CRC-32 checks it): images (magic 2051) -> (N, 28, 28), labels (2049) -> (N,), uint8."""
    fix = "Delete it to download it afresh"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        dims = IDX_DIMS.get(struct.unpack(">I", raw[:4])[0], 0)
        shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    except (OSError, EOFError, struct.error) as failure:
        raise error(f"{path} is corrupt or truncated ({failure}). {fix}") from failure
    header = 4 + 4 * dims
    if not dims or len(raw) != header + math.prod(shape):
        raise error(f"{path} is not an MNIST idx file. {fix}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load_mnist(data_dir):
    """{train, test}: ((N, 28, 28) uint8, (N,) labels); missing files downloaded by torchvision (MD5-checked)."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    paths = {split: [os.path.join(raw, name) for name in names] for split, names in MNIST_FILES.items()}
    if not all(os.path.exists(path) for split in paths.values() for path in split):
        if data_dir != Config.data_dir and not os.path.isdir(data_dir):
            raise error(f"--data-dir {data_dir} does not exist")
        made = [folder for folder in (data_dir, os.path.join(data_dir, "MNIST")) if not os.path.exists(folder)]
        try:
            import torchvision

            torchvision.datasets.MNIST(data_dir, train=True, download=True)
            torchvision.datasets.MNIST(data_dir, train=False, download=True)
        except Exception as failure:
            if made:
                shutil.rmtree(made[0], ignore_errors=True)
            names = ", ".join(name for pair in MNIST_FILES.values() for name in pair)
            raise error(
                f"downloading MNIST (4 files, 11 MB) from {MNIST_URL} into {raw} failed ({failure}); "
                f"put them there by hand ({names})"
            ) from None
    return {split: (read_idx(images), read_idx(labels)) for split, (images, labels) in paths.items()}


def two_digit_images(digits, labels, n, seed):
    """n 64x64 images of two random digits side by side (offsets 0..36 down, 0..4 across), labelled 10 left + right;
    deterministic given the seed. (N, 28, 28), (N,) -> (n, 64, 64) uint8, (n,) uint8."""
    generator = torch.Generator().manual_seed(seed)
    canvas = torch.zeros(n, 64, 64, dtype=torch.uint8)
    number = torch.zeros(n, dtype=torch.uint8)
    for half in (0, 32):
        which = torch.randint(len(digits), (n,), generator=generator)
        number = 10 * number + labels[which]
        top = torch.randint(0, 37, (n,), generator=generator)
        left = half + torch.randint(0, 5, (n,), generator=generator)
        for y in range(37):  # paste every digit that goes to (y, x) at once
            for x in range(half, half + 5):
                here = (top == y) & (left == x)
                canvas[here, y : y + 28, x : x + 28] = digits[which[here]]
    return canvas, number


def load_data(cfg, device):
    """{train, val, test}: (N, H, W) uint8 and {...}_labels (N,) (digit, or 00-99) on the device; val: 1% of train."""
    mnist = load_mnist(cfg.data_dir)
    if cfg.digits == 2:
        mnist["train"] = two_digit_images(*mnist["train"], 60_000, cfg.seed)
        mnist["test"] = two_digit_images(*mnist["test"], 10_000, cfg.seed + 1)
    images, labels = mnist["train"]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_val = len(images) // 100  # 600 of 60,000
    return {
        "train": images[order[n_val:]].to(device),
        "train_labels": labels[order[n_val:]].to(device),
        "val": images[order[:n_val]].to(device),
        "val_labels": labels[order[:n_val]].to(device),
        "test": mnist["test"][0].to(device),
        "test_labels": mnist["test"][1].to(device),
    }


def as_data(images, cfg, generator=None):
    """Dynamic binarisation, drawn afresh at every read: pixel 1 (black) with probability grey / 255. -> (B, H, W)."""
    return torch.bernoulli(images.float() / 255, generator=generator).long()


def get_batch(data, cfg):
    """A random training batch: (B, H, W) pixel classes and, with --conditional, the (B,) labels (else None)."""
    index = torch.randint(len(data["train"]), (cfg.batch_size,), device=data["train"].device)
    labels = data["train_labels"][index].long() if cfg.conditional else None
    return as_data(data["train"][index], cfg), labels


def in_paper_unit(nats, cfg):
    """Nats per image -> the paper's unit, which for MNIST is nats per image (the sum over the 784 pixels)."""
    return nats


# ----------------------------------------------------------------------------------------------------------------------
# Network: the authors' improved-diffusion U-Net for MNIST (mults (1, 2, 2), attention in the middle), tensor for
# tensor: their parameter names (without the `net.` prefix), shapes and function, so their checkpoints load as they are.


def group_norm(c, groups):
    """GroupNorm with the largest number of groups up to `groups` that divides c (the authors': 32)."""
    return nn.GroupNorm(math.gcd(groups, c), c)


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

    def __init__(self, c_in, c_out, c_emb, dropout, groups):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(c_emb, c_out))
        self.out_layers = nn.Sequential(
            group_norm(c_out, groups), nn.SiLU(), nn.Dropout(dropout), zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        )
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, c_emb) -> (B, c_out, H, W)
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]  # (B, c_out, H, W)
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Self-attention over the H x W positions, plus its input; qkv channels per head (q, k, v of head 0, ...)."""

    def __init__(self, c, groups, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(c, groups)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = zero(nn.Conv1d(c, c, 1))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        h = x.flatten(2)  # (B, C, H W)
        qkv = rearrange(self.qkv(self.norm(h)), "b (h three d) s -> three b h s d", three=3, h=self.heads)
        q, k, v = qkv.contiguous()  # contiguous: fast on CPU
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H W, C / heads)
        return x + self.proj_out(rearrange(h, "b h s d -> b (h d) s")).view_as(x)


class Layers(nn.ModuleList):
    """Layers applied in turn, the residual blocks with the time embedding too."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    """Psi(theta, t): 2 theta_0 - 1 (B, H, W) (theta_0: P(white), the authors' convention), t (B,) -> the logit of a
    black pixel (B, H, W), a linear map of the U-Net's output and each pixel's features of [2 theta_0 - 1, 2 t - 1].
    classes > 0: a label y (B,) in 0..classes (classes: none) adds embed_label(y) to t's embedding."""

    def __init__(self, channels=128, mults=(1, 2, 2), res_blocks=2, dropout=0.5, classes=0, groups=32):
        super().__init__()
        c_emb = 4 * channels
        self.channels = channels
        self.classes = classes
        self.input_projection = nn.Linear(2, channels)
        self.time_embed = nn.Sequential(nn.Linear(channels, c_emb), nn.SiLU(), nn.Linear(c_emb, c_emb))
        if classes:  # a row per (position, digit 0-9 or null) of the label's decimal digits: 11 rows, or 22 for 00-99
            self.digits = len(str(classes - 1))
            self.label_embed = nn.Embedding(11 * self.digits, c_emb)
        ch = channels
        self.input_blocks = nn.ModuleList([Layers([nn.Conv2d(ch, ch, 3, padding=1)])])
        skips = [ch]
        for level, mult in enumerate(mults):
            for _ in range(res_blocks):
                self.input_blocks.append(Layers([ResBlock(ch, channels * mult, c_emb, dropout, groups)]))
                ch = channels * mult
                skips.append(ch)
            if level < len(mults) - 1:  # the authors' Downsample: a strided convolution, its weights named op
                down = nn.Sequential(collections.OrderedDict(op=nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
                self.input_blocks.append(Layers([down]))
                skips.append(ch)
        middle = [
            ResBlock(ch, ch, c_emb, dropout, groups),
            Attention(ch, groups),
            ResBlock(ch, ch, c_emb, dropout, groups),
        ]
        self.middle_block = Layers(middle)
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(res_blocks + 1):
                layers = Layers([ResBlock(ch + skips.pop(), channels * mult, c_emb, dropout, groups)])
                ch = channels * mult
                if level > 0 and i == res_blocks:  # the authors' Upsample: nearest neighbour, then a convolution
                    up = collections.OrderedDict(up=nn.Upsample(scale_factor=2), conv=nn.Conv2d(ch, ch, 3, padding=1))
                    layers.append(nn.Sequential(up))
                self.output_blocks.append(layers)
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), zero(nn.Conv2d(ch, channels, 3, padding=1)))
        self.output_projection = nn.Linear(2 * channels, 1)

    def forward(self, x, t, y=None):  # (B, H, W), (B,), (B,) or None -> (B, H, W)
        features = torch.stack([x, (2 * t - 1)[:, None, None].expand_as(x)], -1)  # (B, H, W, 2)
        x = self.input_projection(features)  # (B, H, W, channels)
        emb = self.time_embed(time_embedding(t, self.channels))  # (B, 4 channels)
        if self.classes:
            if y is None:
                y = torch.full_like(t, self.classes, dtype=torch.long)
            emb = emb + self.embed_label(y)
        h = x.permute(0, 3, 1, 2).contiguous()  # (B, channels, H, W); contiguous: GroupNorm is slow otherwise
        hs = []
        for layers in self.input_blocks:
            h = layers(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for layers in self.output_blocks:
            h = layers(torch.cat([h, hs.pop()], 1), emb)  # (B, C + C_skip, H', W'): the skip connection
        out = self.out(h).permute(0, 2, 3, 1)  # (B, H, W, channels)
        return self.output_projection(torch.cat([x, out], -1))[..., 0]

    def embed_label(self, y):  # (B,) -> (B, 4 channels)
        """The sum over the label's decimal digits of a learned vector for (position, digit), the null label being the
        null digit 10 at every position: for 00-99 what a 4 looks like on the left is learnt from every number 40-49."""
        null = y == self.classes
        emb = 0
        for position in range(self.digits):
            digit = torch.where(null, 10, y // 10 ** (self.digits - 1 - position) % 10)
            emb = emb + self.label_embed(11 * position + digit)
        return emb


def make_network(cfg):
    """The U-Net of the settings, with a label embedding for --conditional."""
    classes = 10**cfg.digits if cfg.conditional else 0
    return UNet(cfg.channels, (1, 2, 2), cfg.res_blocks, cfg.dropout, classes)


def from_authors(state):
    """A state_dict of the authors' BFN module (`net.` + their names) -> this network's (their fixed features not)."""
    ours = {}
    for name, tensor in state.items():
        name = name.removeprefix("net.").replace("output_adapter.output_projection.", "output_projection.")
        if not name.startswith("input_adapter."):
            ours[name] = tensor
    return ours


# ----------------------------------------------------------------------------------------------------------------------
# BFN: the network as the output distribution of discrete data (§6.4), the loss, the test bound and the samplers.


def output_log_probs(net, theta, t, runtime, labels=None):
    """ln p_O(k | theta, t) from the network's logit of a black pixel, as log-sigmoids in float32 (exact for confident
    pixels): theta (B, H, W, 2), t (B,), labels (B,) of a conditional network or None -> (B, H, W, 2)."""
    with runtime.autocast:
        logit = net(2 * theta[..., 0] - 1, t, labels)  # (B, H, W)
    logit = logit.float()  # the log-odds of black
    return torch.stack([F.logsigmoid(-logit), F.logsigmoid(logit)], -1)


def drop_labels(labels, cfg, p_null=0.1):
    """Labels (B,), a fraction p_null made the null label 10 ** --digits: one network learns p(x | class) and p(x),
    as classifier-free guidance needs (Ho and Salimans, arXiv:2207.12598); None (unconditional) stays None."""
    if labels is None:
        return None
    null = torch.rand(len(labels), device=labels.device) < p_null
    return torch.where(null, 10**cfg.digits, labels)


def train_loss(net, batch, cfg, runtime):
    """L^inf (§6.7, Algorithm 8) of a batch (x (B, H, W), labels or None): t ~ U(0, 1), theta ~ p_F. (B,) nats."""
    x, labels = batch
    t = common.training_times(len(x), cfg.t_draw == "stratified", device=x.device)
    theta = common.discrete_flow(x, t, cfg.beta_1, K)
    probs = output_log_probs(net, theta, t, runtime, drop_labels(labels, cfg)).exp()
    return common.discrete_loss_inf(x, probs, t, cfg.beta_1)


def make_optimizer(model, lr):
    """The paper's AdamW: weight decay 0.01 on the weights of linear and convolutional layers, none on biases, norms."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    weights = [p for p in model.parameters() if id(p) in decayed]
    others = [p for p in model.parameters() if id(p) not in decayed]
    groups = [{"params": weights, "weight_decay": 0.01}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr, ADAMW_BETAS)


def optimizer_step(cfg, model, ema, optimizer, step, progress=None):
    """The learning rate (warm-up, cosine to 0.1 --lr), clipping at norm 5, AdamW, and the EMA (warm-up to 0.9999)."""
    if progress is None:
        progress = min(1.0, max(0, step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup))
    decay = 1.0
    if cfg.lr_decay == "cosine":
        decay = 0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.lr_warmup)) * decay
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for ema_weight, weight in zip(ema.parameters(), model.parameters()):
            ema_weight.lerp_(weight, 1 - min(0.9999, (2 + step) / (11 + step)))  # TensorFlow's (1 + n) / (10 + n)
    return grad_norm


MEMORY_ADVICE = "lower --batch-size and raise --grad-accum as much (the same global batch), or use --preset quick"
CGROUP = "/sys/fs/cgroup/"  # where Linux keeps a container's memory limit and usage
CGROUP_FILES = [("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")]


def check_memory(cfg, runtime, model, data):
    """Stop before the first step unless the batch's activations, gradients and AdamW moments fit in free memory."""
    kept = {}  # the bytes of each storage kept, counted once

    def keep(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        train_loss(model, get_batch(data, dataclasses.replace(cfg, batch_size=1)), cfg, runtime)
    weights = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    per_example = sum(size for pointer, size in kept.items() if pointer not in weights)  # its peak: 1.1-1.3 times this
    need = 1.6 * per_example * cfg.batch_size + 3 * sum(weights.values())  # with a margin; gradients, AdamW's moments
    free = [torch.cuda.mem_get_info(runtime.device)[0] if runtime.device.type == "cuda" else math.inf]
    if runtime.device.type == "cpu":  # as Linux counts it, and within a container's limit (cgroup v2 or v1)
        with contextlib.suppress(OSError), open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        for limit, usage in CGROUP_FILES:  # no such files, or no limit ("max"): nothing to add
            with contextlib.suppress(OSError, ValueError), open(CGROUP + limit) as a, open(CGROUP + usage) as b:
                free.append(int(a.read()) - int(b.read()))
    usage = f"a step of --batch-size {cfg.batch_size} needs about {need / 2**30:.1f} GiB"
    if need > min(free):
        raise error(f"{usage}, and {runtime.device} has {min(free) / 2**30:.1f} GiB free: {MEMORY_ADVICE}")
    runtime.log(f"{usage}, {min(free) / 2**30:.1f} GiB free")


@torch.no_grad()
def evaluate(net, cfg, runtime, data, step):
    """The test bound -ln p(x) <= L^n + L^r (§6.6, §6.9; inf: L^inf, §6.7) for each --eval-n on the first
    --eval-examples test images, --eval-repeats passes with fresh binarisations and noise, the steps i of L^n
    stratified."""
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    images = data["test"][: cfg.eval_examples or None]

    def log_probs(x, t):  # ln p_O at theta ~ p_F(. | x; t)
        theta = common.discrete_flow(x, t, cfg.beta_1, K, generator)
        return output_log_probs(net, theta, t, runtime)

    losses = {n: [] for n in cfg.eval_n}
    recon = []
    for _ in range(cfg.eval_repeats):
        for start in range(0, len(images), cfg.batch_size):
            x = as_data(images[start : start + cfg.batch_size], cfg, generator)
            recon.append(common.discrete_recon_loss(x, log_probs(x, torch.ones(len(x), device=x.device))))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(len(x), generator=generator, device=x.device)
                    losses[n].append(common.discrete_loss_inf(x, log_probs(x, t).exp(), t, cfg.beta_1))
                else:
                    i = common.stratified_steps(int(n), len(x), generator, x.device)  # every step as often
                    t = (i - 1) / int(n)
                    losses[n].append(common.discrete_loss_n(x, log_probs(x, t), i, int(n), cfg.beta_1, generator))
    return write_eval(losses, recon, cfg, runtime, step)


def write_eval(losses, recon, cfg, runtime, step):
    """Losses in nats ({n: [(B,), ...]}, [(B,), ...], pass after pass) -> the bound's mean and standard error over
    examples in the paper's unit (each example's passes averaged first), in eval.json and the log."""
    recon = in_paper_unit(torch.cat(recon).double().view(cfg.eval_repeats, -1).mean(0), cfg)
    result = {}
    for n, parts in losses.items():
        total = in_paper_unit(torch.cat(parts).double().view(cfg.eval_repeats, -1).mean(0), cfg) + recon
        stderr = total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")
        loss = (total - recon).mean().item()
        result[n] = {"loss": loss, "recon": recon.mean().item(), "total": total.mean().item(), "stderr": stderr}
    report = {"step": step, "split": "test", "unit": UNIT, "examples": len(recon), "repeats": cfg.eval_repeats}
    report["n"] = result
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
    bounds = [f"L^{n}+L^r {r['total']:.4g} ± {r['stderr']:.2g} (L^r {r['recon']:.3g})" for n, r in result.items()]
    runtime.log(f"test bound at step {step}: {' | '.join(bounds)} {UNIT} | eval.json")
    return report


SAMPLERS = {"paper": common.discrete_sample, "ode": common.discrete_sample_ode, "sde": common.discrete_sample_sde}


def prediction(net, cfg, runtime, labels=None):
    """The network as the samplers take it, (theta, t) -> p_O(. | theta, t); labels (B,) or None (the null label)."""

    def probs(theta, t):
        return output_log_probs(net, theta, t, runtime, labels).exp()

    return probs


@torch.no_grad()
def generate(predict, n, cfg, runtime, generator):
    """n images (n, H, W) of pixel classes by the --sampler (Algorithm 9, ODE, SDE) from predict (prediction())."""
    size = 64 if cfg.digits == 2 else 28
    sampler = SAMPLERS[cfg.sampler]
    return sampler(
        predict, (n, size, size), cfg.sample_steps, cfg.beta_1, K, generator=generator, device=runtime.device
    )


# ----------------------------------------------------------------------------------------------------------------------
# Figures: grids and animations of samples, and the samples themselves for benchmarks/score_samples.py.


def recording(predict, trajectory, rows=8):
    """predict, appending at each call its t and, for the first `rows` images, theta and p_O to trajectory."""

    def call(theta, t):
        probs = predict(theta, t)
        trajectory.append({"t": t[0].item(), "input": theta[:rows], "output": probs[:rows]})
        return probs

    return call


def save_samples(x, labels, cfg, name):
    """Samples (N, H, W) and their classes (N,) or None, with the run's settings, for benchmarks/score_samples.py."""
    labels = None if labels is None else labels.cpu()
    saved = {"samples": x.to(torch.uint8).cpu(), "labels": labels, "script": SCRIPT, "config": dataclasses.asdict(cfg)}
    torch.save(saved, os.path.join(cfg.out_dir, name))


def save_gif(frames, nrow, path, max_frames=100):
    """An animated GIF of grids of frames [(N, C, H, W) in [0, 1]], at most max_frames evenly spaced, the last held."""
    from PIL import Image
    from torchvision.utils import make_grid

    keep = range(len(frames))
    if len(frames) > max_frames:
        keep = sorted({round(k * (len(frames) - 1) / (max_frames - 1)) for k in range(max_frames)})
    images = []
    for k in keep:
        grid = make_grid(frames[k].float().cpu(), nrow=nrow, pad_value=0.5).clamp(0, 1)  # (3, H', W')
        images.append(Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy()))
    durations = [80] * (len(images) - 1) + [2000]  # milliseconds per frame; the samples held at the end
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


@torch.no_grad()
def write_samples(net, cfg, runtime):
    """samples.png (conditional: a row per class), samples-SAMPLER-STEPS.pt, evolution.png (4 samples: theta, then
    p_O, of a black pixel at t = 0, 0.1, ..., 1) and evolution.gif (every network call, 8 samples)."""
    from torchvision.utils import save_image

    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    n = cfg.num_samples
    nrow = max(1, round(math.sqrt(n)))
    labels = None
    if cfg.conditional:  # each class in turn, a row each
        nrow = max(1, n // 10**cfg.digits)
        labels = torch.arange(10**cfg.digits, device=runtime.device).repeat_interleave(nrow)
        n = len(labels)
    trajectory = []
    batches = []
    for index in torch.arange(n).split(cfg.batch_size):
        predict = prediction(net, cfg, runtime, None if labels is None else labels[index])
        if index[0] == 0:
            predict = recording(predict, trajectory)
        batches.append(generate(predict, len(index), cfg, runtime, generator))
    x = torch.cat(batches)
    name = f"samples-{cfg.sampler}-{cfg.sample_steps}.pt"
    save_image(1 - x[:, None].float(), os.path.join(cfg.out_dir, "samples.png"), nrow=nrow, pad_value=0.5)
    save_samples(x, labels, cfg, name)
    times = [min(trajectory, key=lambda call: abs(call["t"] - k / 10)) for k in range(11)]  # t = 0, 0.1, ..., 1
    rows = []
    for b in range(min(4, len(x))):
        rows += [call["input"][b, ..., 1] for call in times] + [call["output"][b, ..., 1] for call in times]
    save_image(1 - torch.stack(rows)[:, None], os.path.join(cfg.out_dir, "evolution.png"), nrow=11, pad_value=0.5)
    shown = min(8, len(x))  # evolution.gif: a frame per network call, theta above p_O, then the samples
    frames = [1 - torch.cat([c["input"][:shown, ..., 1], c["output"][:shown, ..., 1]])[:, None] for c in trajectory]
    frames.append(1 - torch.cat([x[:shown], x[:shown]]).float()[:, None])
    save_gif(frames, shown, os.path.join(cfg.out_dir, "evolution.gif"))
    runtime.log(f"samples ({cfg.sampler}, {cfg.sample_steps} steps): samples.png, {name}, evolution.png, evolution.gif")


# ======================================================================================================================
# Run machinery: the same in every script, calling the experiment above; safe to skip on a first reading.
# ======================================================================================================================

PREEMPTED = 75  # the exit code after a stop signal: the checkpoint is written; continue with --resume (EX_TEMPFAIL)
RUN_MODES = ("preset", "resume", "eval_only", "sample_only", "init_from", "out_dir", "device", "compile")  # not kept
STOP_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)]


def prepare(argv=None):
    """The flags -> (cfg, runtime, ckpt): the settings (over a checkpoint's), the device and log, the checkpoint."""
    given = parse_flags(argv)
    preset = PRESETS[given.get("preset", "paper")]
    defaults = {field.name: field.default for field in dataclasses.fields(Config)} | preset
    modes = {name: value for name, value in given.items() if name in RUN_MODES}
    cfg = Config(**(defaults | modes))  # enough to find the device and a checkpoint
    runtime = setup(cfg)
    ckpt = None
    saved = {}
    if cfg.init_from or cfg.resume or cfg.eval_only or cfg.sample_only:
        ckpt = read_checkpoint(cfg, runtime)
        fixed = [field.name for field in dataclasses.fields(Config) if field.metadata["fixed"]]
        kept = fixed if cfg.init_from else [name for name in defaults if name not in RUN_MODES]
        saved = {name: value for name, value in ckpt.get("config", {}).items() if name in kept}
        for name in fixed:
            if name in saved and name in given and given[name] != saved[name]:
                change = f"--{name.replace('_', '-')} {saved[name]} in the checkpoint, {given[name]} now"
                raise error(f"the checkpoint's model or data differ: {change}; leave it out")
    cfg = Config(**(defaults | saved | given))
    check(cfg)
    return cfg, runtime, ckpt


def setup(cfg):
    """This process's device, rank of `world` (torchrun), network autocast, and log(line): rank 0 prints and logs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpus = torch.cuda.device_count()
    here = ["cpu"] + [f"cuda:{k}" for k in range(gpus)] + (["mps"] if torch.backends.mps.is_available() else [])
    name = here[-1] if cfg.device == "auto" else cfg.device  # auto: the last of cpu, cuda:N, mps
    if name in ("cuda", "cuda:0") and gpus:  # under torchrun, this process's own GPU
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % gpus}"
    if name not in here:
        raise error(f"--device {cfg.device} is not available here; available: {', '.join(here)}")
    if world > 1:  # the others wait while rank 0 evaluates: a long timeout
        dist.init_process_group("nccl" if "cuda" in name else "gloo", timeout=datetime.timedelta(hours=1))
    rank = dist.get_rank() if world > 1 else 0

    def log(line):
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            line = time.strftime("%H:%M:%S ") + line
            print(line, flush=True)
            with open(os.path.join(cfg.out_dir, "log.txt"), "a") as f:
                print(line, file=f)

    device = torch.device(name)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    return types.SimpleNamespace(device=device, rank=rank, world=world, autocast=autocast, log=log)


def read_checkpoint(cfg, runtime):
    """--init-from's checkpoint, or <out-dir>/ckpt.pt (ckpt-prev.pt if that is unreadable); weights_only: no code."""
    paths = [cfg.init_from] if cfg.init_from else [os.path.join(cfg.out_dir, n) for n in ("ckpt.pt", "ckpt-prev.pt")]
    for path in filter(os.path.exists, paths):
        try:
            ckpt = torch.load(path, map_location=runtime.device, weights_only=True)
        except Exception as failure:  # a truncated or foreign file fails in many ways inside torch.load
            runtime.log(f"warning: {path} is unreadable ({type(failure).__name__}); trying the next")
            continue
        if ckpt.get("script", SCRIPT) != SCRIPT:
            raise error(f"{path} is a checkpoint of {ckpt['script']}; use that script")
        return ckpt
    raise error(f"no readable checkpoint: {' or '.join(paths)}")


def build(cfg, runtime, ckpt):
    """The network, its EMA copy and optimiser, with the checkpoint's weights and state; and the step to start from."""
    with torch.random.fork_rng(devices=[]):  # the initial weights from --seed; the global generator untouched
        torch.manual_seed(cfg.seed)
        model = make_network(cfg)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    note = ": the paper's size, meant for GPUs; --preset quick trains a small one" if size > 10 else ""
    runtime.log(f"{size:.2f}M parameters{note if runtime.device.type != 'cuda' else ''}")
    model = model.to(runtime.device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = make_optimizer(model, cfg.lr)
    if ckpt is None:
        return model, ema, optimizer, 0
    state = ckpt["model"] if "model" in ckpt else from_authors(ckpt)
    try:
        model.load_state_dict(state)
        ema.load_state_dict(ckpt.get("ema", state))
    except RuntimeError as failure:  # tensors missing, unexpected or of other shapes
        first = (str(failure).splitlines()[1:] or [""])[0].strip()[:300]
        flags = " ".join("--" + f.name.replace("_", "-") for f in dataclasses.fields(Config) if f.metadata["fixed"])
        where = cfg.init_from or cfg.out_dir
        raise error(f"{where} does not fit this network ({first}); give its {flags}") from None
    if cfg.init_from:
        return model, ema, optimizer, 0
    optimizer.load_state_dict(ckpt["optimizer"])
    return model, ema, optimizer, ckpt["step"]


def save_checkpoint(cfg, model, ema, optimizer, step):
    """<out-dir>/ckpt.pt through a temporary file, renamed; the previous one kept as ckpt-prev.pt."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    torch.save(state | {"config": dataclasses.asdict(cfg), "script": SCRIPT}, path + ".tmp")
    if os.path.exists(path):
        os.replace(path, os.path.join(cfg.out_dir, "ckpt-prev.pt"))
    os.replace(path + ".tmp", path)


def train(cfg, runtime, data, model, ema, optimizer, step):
    """Steps to --steps, a log line every --log-every, a checkpoint every 10 minutes, at the end and on a signal."""
    net = DDP(model, [runtime.device.index] if runtime.device.type == "cuda" else None) if runtime.world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    received = None  # a first SIGTERM, SIGINT or SIGUSR1 (those the platform has): stop after the step in progress

    def stop(signum, frame):  # then the default action again: a second signal ends the process at once
        nonlocal received
        received = signal.Signals(signum).name
        print(f"{received}: stopping after step {step + 1}; a second signal stops at once", flush=True)
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    check_memory(cfg, runtime, model, data)
    previous_handlers = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    first = step
    logged = step
    logged_at = time.time()
    saved_at = time.time()
    losses = 0.0
    try:
        while step < cfg.steps:
            torch.manual_seed(hash((cfg.seed, runtime.rank, step)) % 2**62)  # data and noise from the seed and step
            for micro in range(cfg.grad_accum):
                sync = runtime.world == 1 or micro == cfg.grad_accum - 1  # all-reduce the gradients once, at the last
                with contextlib.nullcontext() if sync else net.no_sync():
                    loss = train_loss(net, get_batch(data, cfg), cfg, runtime).mean() / cfg.grad_accum
                    loss.backward()
                losses += loss.item()
            grad_norm = optimizer_step(cfg, model, ema, optimizer, step)
            step += 1
            if not math.isfinite(losses + grad_norm):
                raise error(f"non-finite loss at step {step}; the last checkpoint is untouched")
            stopping = torch.tensor(float(received is not None), device=runtime.device)
            if runtime.world > 1:
                dist.all_reduce(stopping)  # a signal to any process stops them all
            if step % cfg.log_every == 0 or step in (first + 1, cfg.steps):
                seconds = time.time() - logged_at
                loss = in_paper_unit(losses / (step - logged), cfg)  # this process's mean since the last line
                speed = (step - logged) * cfg.batch_size * cfg.grad_accum * runtime.world / seconds
                memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak resident size (Linux: KiB)
                if runtime.device.type == "cuda":
                    memory = torch.cuda.max_memory_allocated(runtime.device) / 2**30
                eta = (cfg.steps - step) * seconds / (step - logged) / 60
                done = f"step {step} | loss {loss:.4g} {UNIT} | grad norm {grad_norm:.3g}"
                runtime.log(f"{done} | {speed:.1f} examples/s | {memory:.2f} GiB | ETA {eta:.1f} min")
                logged = step
                logged_at = time.time()
                losses = 0.0
            if runtime.rank == 0 and (stopping or step == cfg.steps or time.time() - saved_at > 600):
                save_checkpoint(cfg, model, ema, optimizer, step)
                saved_at = time.time()
            if stopping:
                by = received or "a signal to another process"
                runtime.log(f"stopped by {by} after step {step}: checkpoint written; continue with --resume")
                raise SystemExit(PREEMPTED)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    return step


def main(argv=None):
    """Train (or only evaluate, or only sample) in the run directory, as the flags say."""
    cfg, runtime, ckpt = prepare(argv)
    command = shlex.join(["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    runtime.log(f"==== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} | {command} | {runtime.device} x {runtime.world}")
    model, ema, optimizer, step = build(cfg, runtime, ckpt)
    data = load_data(cfg, runtime.device)
    try:
        if not (cfg.eval_only or cfg.sample_only):
            step = train(cfg, runtime, data, model, ema, optimizer, step)
        if runtime.rank == 0 and not cfg.sample_only:
            evaluate(ema, cfg, runtime, data, step)
        if runtime.rank == 0 and not cfg.eval_only:
            write_samples(ema, cfg, runtime)
    except torch.cuda.OutOfMemoryError:
        raise error(f"out of memory on {runtime.device} at --batch-size {cfg.batch_size}: {MEMORY_ADVICE}") from None
    runtime.log(f"done: {cfg.out_dir}")
    if runtime.world > 1:
        dist.barrier()  # the other processes wait for rank 0's evaluation and samples
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
