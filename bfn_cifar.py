"""Bayesian Flow Network on CIFAR-10 (§4 and §5 of Graves et al., arXiv:2308.07037): continuous or discretised data.

Trains the authors' VDM-style U-Net with the continuous-time loss L^inf (Algorithms 2 and 5), evaluates the test bound
L^n + L^r in bits/dim (the paper: 2.66 with 256 bins, in continuous time) and samples with Algorithms 3 and 6, or the
ODE or SDE solver of common.py. --output continuous: p_O is a delta at the predicted x_hat (§4); discretised: a clipped
discretised Gaussian (§5). --bins: 8-bit pixels, or 16 levels. Writes log.txt, ckpt.pt, eval.json, samples.png and
.pt, and evolution.png/.gif (mu and the prediction over time) to --out-dir.

    python bfn_cifar.py --preset quick                       # a small U-Net, minutes on a CPU
    python bfn_cifar.py                                      # the paper's model: discretised, 256 bins
    python bfn_cifar.py --output continuous --bins 16        # sigma_1 = sqrt(0.001), as the paper's 16-bin runs
    torchrun --nproc_per_node=8 bfn_cifar.py --batch-size 4  # the paper's global batch of 32 on 8 GPUs
    python bfn_cifar.py --sample-only --sampler sde --sample-steps 25 --num-samples 500

Sampling a trained model beyond the paper (inpainting, guidance) is in beyond/, one command per feature.
Shapes: B batch, C = 3 colour channels, H = W = 32, K bins.
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import pickle
import resource
import shlex
import shutil
import signal
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

SCRIPT = "bfn_cifar.py"
UNIT = "bits/dim"
D = 3 * 32 * 32  # the dimensions of an image
ADAMW_BETAS = (0.9, 0.99)
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

    data_dir: str = setting("data", "where CIFAR-10 is, or is downloaded to (DIR/cifar-10-batches-py)")
    bins: int = setting(256, "K: 256 (8-bit pixels) or 16 (pixels quantised to 4 bits)", (256, 16), fixed=True)
    output: str = setting(
        "discretised", "the output distribution (§4 or §5)", ("continuous", "discretised"), fixed=True
    )
    conditional: bool = setting(False, "a class-conditional network: it also sees the class", fixed=True)
    sigma_1: float = setting(
        None, "final input std (§4.5) (default: 0.001, sqrt(0.001) for 16 bins)", low=0.0, fixed=True
    )
    channels: int = setting(128, "U-Net channels (a multiple of 8)", low=8, fixed=True)
    res_blocks: int = setting(32, "residual blocks (all at full resolution)", low=1, fixed=True)
    steps: int = setting(100_000, "optimiser steps to train (the total, also when resuming)", low=1)
    batch_size: int = setting(32, "images per process and step, also of evaluation and sampling", low=1)
    grad_accum: int = setting(1, "batches accumulated per optimiser step", low=1)
    lr: float = setting(2e-4, "AdamW learning rate", low=0.0)
    t_draw: str = setting("uniform", "t of a training batch: each alone, or one per 1/B of [0, 1]", TIME_DRAWS)
    eval_n: tuple = setting(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = setting(0, "evaluate on the first N test images (0: all)", low=0)
    eval_repeats: int = setting(1, "passes over them with fresh noise", low=1)
    sampler: str = setting(
        "paper", "Algorithms 3 and 6, or the second-order ODE or SDE solver", ("paper", "ode", "sde")
    )
    sample_steps: int = setting(1000, "generation steps n", low=1)
    num_samples: int = setting(64, "images to sample (with --conditional: about as many, a row per class)", low=1)
    preset: str = setting("paper", "the paper's settings, or a small CPU recipe; flags given win", ("paper", "quick"))
    out_dir: str = setting("runs/bfn_cifar", "the run directory")
    resume: bool = setting(False, "continue from <out-dir>/ckpt.pt with its settings (flags given change them)")
    init_from: str = setting("", "start from the weights of another run's ckpt.pt or an authors' checkpoint")
    eval_only: bool = setting(False, "evaluate the checkpoint in <out-dir> on the test set")
    sample_only: bool = setting(False, "sample from the checkpoint in <out-dir>")
    seed: int = setting(0, "everything random derives from it")
    device: str = setting("auto", "auto (cuda, mps or cpu), cpu, cuda (this process's GPU), cuda:N or mps")
    compile: bool = setting(False, "torch.compile the network for training")
    log_every: int = setting(100, "steps between log lines", low=1)
    dropout: float = setting(0.1)  # in the residual blocks
    lr_warmup: int = setting(0)  # steps of linear learning-rate warm-up (the paper: none)
    lr_decay: str = setting("none")  # "cosine": down to 0.1 --lr at --steps (the paper: constant)

    def __post_init__(self):  # no --sigma-1: the paper's for the bins
        if self.sigma_1 is None:
            self.sigma_1 = 0.001 if self.bins == 256 else math.sqrt(0.001)


QUICK_NETWORK = {"output": "continuous", "channels": 32, "res_blocks": 2, "dropout": 0.0}  # tuned on CIFAR-10
QUICK_TRAINING = {"lr": 1e-3, "batch_size": 16, "steps": 5450}  # about 15 minutes on 2 Xeon cores
PRESETS = {"paper": {}, "quick": QUICK_NETWORK | QUICK_TRAINING | {"eval_examples": 500, "sample_steps": 100}}
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
    if not cfg.sigma_1 < 1:
        raise error(f"--sigma-1 must be less than 1, got {cfg.sigma_1}")
    if cfg.channels % 8:
        raise error(f"--channels must be a multiple of 8, got {cfg.channels}")
    if cfg.conditional and GROUPS % cfg.channels == 0:
        raise error(f"--conditional needs more --channels than the {GROUPS} GroupNorm groups")


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
# Data: CIFAR-10 as uint8 tensors on the device; a batch is quantised to the centres of --bins bins.

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # torchvision's source
CIFAR_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}


def read_cifar_batch(path):
    """One python-pickled CIFAR-10 batch -> ((N, 3, 32, 32) uint8 images, (N,) labels)."""
    fix = "Delete the folder to download it afresh"
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images = torch.as_tensor(batch["data"])
        labels = torch.as_tensor(batch["labels"])
    except Exception as failure:  # a truncated or foreign file fails in many ways inside pickle
        reason = f"{type(failure).__name__}: {failure}"
        raise error(f"{path} is corrupt or not a CIFAR-10 batch ({reason}). {fix}") from None
    if images.dtype != torch.uint8 or images.dim() != 2 or images.shape[1] != D or len(labels) != len(images):
        found = f"{tuple(images.shape)} {images.dtype}"
        raise error(f"{path} holds {found} data, expected (N, {D}) uint8. {fix}")
    return images.reshape(-1, 3, 32, 32), labels


def load_cifar(data_dir):
    """{train, test}: ((N, 3, 32, 32) uint8, (N,) labels); missing files downloaded by torchvision (MD5-checked)."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not all(os.path.exists(os.path.join(folder, name)) for names in CIFAR_FILES.values() for name in names):
        if data_dir != Config.data_dir and not os.path.isdir(data_dir):
            raise error(f"--data-dir {data_dir} does not exist")
        made = not os.path.exists(data_dir)
        try:
            import torchvision

            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as failure:
            if made:
                shutil.rmtree(data_dir, ignore_errors=True)
            raise error(
                f"downloading CIFAR-10 (163 MB) from {CIFAR_URL} into {data_dir} failed ({failure}); "
                "put the extracted cifar-10-batches-py folder there by hand"
            ) from None
    cifar = {}
    for split, names in CIFAR_FILES.items():
        batches = [read_cifar_batch(os.path.join(folder, name)) for name in names]
        cifar[split] = (torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches]))
    return cifar


def load_data(cfg, device):
    """{train, val, test}: (N, 3, 32, 32) uint8 and {...}_labels (N,) on the device; val: 1% of the training set."""
    cifar = load_cifar(cfg.data_dir)
    images, labels = cifar["train"]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    n_val = len(images) // 100  # 500 of 50,000
    return {
        "train": images[order[n_val:]].to(device),
        "train_labels": labels[order[n_val:]].to(device),
        "val": images[order[:n_val]].to(device),
        "val_labels": labels[order[:n_val]].to(device),
        "test": cifar["test"][0].to(device),
        "test_labels": cifar["test"][1].to(device),
    }


def as_data(images, cfg, generator=None):
    """8-bit pixels v (B, 3, 32, 32) -> the centre of bin floor(v K / 256) on [-1, 1] (§5.1), K = --bins; float32."""
    return common.bin_centres(cfg.bins, device=images.device)[images.long() * cfg.bins // 256]


def get_batch(data, cfg):
    """A random training batch: (B, 3, 32, 32) bin centres and, with --conditional, the (B,) labels (else None)."""
    index = torch.randint(len(data["train"]), (cfg.batch_size,), device=data["train"].device)
    labels = data["train_labels"][index].long() if cfg.conditional else None
    return as_data(data["train"][index], cfg), labels


def in_paper_unit(nats, cfg):
    """Nats per image -> the paper's unit, bits per dimension: nats / (3072 ln 2)."""
    return nats / (D * math.log(2))


# ----------------------------------------------------------------------------------------------------------------------
# Network: the authors' VDM-style U-Net for CIFAR-10 (every block at full resolution, one attention head in the middle,
# Fourier features of the input), tensor for tensor: their parameter names (inside `net.`, see from_authors), shapes
# and function.


def group_norm(c, groups):
    """GroupNorm with the largest number of groups up to `groups` that divides c (the authors': 32)."""
    return nn.GroupNorm(math.gcd(groups, c), c)


def zero(layer):
    """The layer with its weights (and bias) set to zero: a residual branch that starts switched off."""
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


def time_embedding(t, dim):
    """VDM's [sin, cos] of 1000 (t + 0.001) at frequencies 10^(-4 k / (dim / 2 - 1)). (B,) -> (B, dim)."""
    freqs = torch.logspace(0, -4, dim // 2, device=t.device)
    args = 1000 * (t.float() + 0.001)[:, None] * freqs  # (B, dim / 2)
    return torch.cat([args.sin(), args.cos()], -1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, plus t's embedding projected (from zero); GroupNorm, SiLU, dropout, conv; plus input."""

    def __init__(self, c_in, c_out, c_emb, dropout, groups):
        super().__init__()
        self.net1 = nn.Sequential(group_norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.cond_proj = zero(nn.Linear(c_emb, c_out, bias=False))
        self.net2 = nn.Sequential(
            group_norm(c_out, groups), nn.SiLU(), nn.Dropout(dropout), zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        )
        self.skip_conv = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, c_emb) -> (B, c_out, H, W)
        h = self.net1(x) + self.cond_proj(emb)[:, :, None, None]  # (B, c_out, H, W)
        return self.skip_conv(x) + self.net2(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions, with a residual connection."""

    def __init__(self, c, groups, heads=1):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = zero(nn.Conv2d(c, c, 1))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        qkv = rearrange(self.qkv(self.norm(x)), "b (three h d) y x -> three b h (y x) d", three=3, h=self.heads)
        q, k, v = qkv.contiguous()  # contiguous: fast on CPU
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H W, C / heads)
        return x + self.proj_out(rearrange(h, "b h (y x) d -> b (h d) y x", y=x.shape[2]))


def fourier_features(x, exponents=(6, 7)):
    """VDM's input features sin(2^n pi x), cos(2^n pi x), fine detail of mu. (B, C, H, W) -> (B, 4C, H, W)."""
    f = torch.cat([2**n * math.pi * x for n in exponents], 1)  # (B, 2C, H, W)
    return torch.cat([f.sin(), f.cos()], 1)


class UNet(nn.Module):
    """Psi(mu, t): mu (B, 3, 32, 32), t (B,) -> eps_hat (B, 1, 3, 32, 32) or (mu_eps, ln sigma_eps) (B, 2, ...), a
    linear map of the U-Net's features and mu. classes > 0: a label y (B,) in 0..classes (classes: none) adds to t's."""

    def __init__(self, channels=128, res_blocks=32, dropout=0.1, n_out=1, classes=0, groups=32):
        super().__init__()
        ch = channels
        c_emb = 4 * channels
        self.channels = channels
        self.n_out = n_out
        self.classes = classes
        self.embed_conditioning = nn.Sequential(nn.Linear(ch, c_emb), nn.SiLU(), nn.Linear(c_emb, c_emb), nn.SiLU())
        if classes:
            self.label_embed = nn.Embedding(classes + 1, c_emb)
        self.conv_in = nn.Conv2d(3 * 5, ch, 3, padding=1)  # the input and its 4 Fourier features per channel
        self.down_blocks = nn.ModuleList([ResBlock(ch, ch, c_emb, dropout, groups) for _ in range(res_blocks)])
        self.mid_resnet_block_1 = ResBlock(ch, ch, c_emb, dropout, groups)
        self.mid_attn_block = Attention(ch, groups)
        self.mid_resnet_block_2 = ResBlock(ch, ch, c_emb, dropout, groups)
        self.up_blocks = nn.ModuleList([ResBlock(2 * ch, ch, c_emb, dropout, groups) for _ in range(res_blocks + 1)])
        self.conv_out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), zero(nn.Conv2d(ch, ch, 3, padding=1)))
        self.output_projection = nn.Linear(3 + ch, 3 * n_out)

    def forward(self, x, t, y=None):  # (B, 3, H, W), (B,), (B,) or None -> (B, n_out, 3, H, W)
        emb = self.embed_conditioning(time_embedding(t, self.channels))  # (B, 4 channels)
        if self.classes:
            if y is None:
                y = torch.full_like(t, self.classes, dtype=torch.long)
            emb = emb + self.label_embed(y)
        h = self.conv_in(torch.cat([x, fourier_features(x)], 1))  # (B, 15, H, W) -> (B, channels, H, W)
        hs = [h]
        for block in self.down_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.mid_resnet_block_2(self.mid_attn_block(self.mid_resnet_block_1(h, emb)), emb)
        for block in self.up_blocks:
            h = block(torch.cat([h, hs.pop()], 1), emb)  # (B, 2 channels, H, W): the skip connection
        out = torch.cat([x, self.conv_out(h)], 1).permute(0, 2, 3, 1)  # (B, H, W, 3 + channels)
        return rearrange(self.output_projection(out), "b y x (c o) -> b o c y x", o=self.n_out)


def make_network(cfg):
    """The U-Net of the settings: one output per sub-pixel (continuous), or two (discretised); --conditional."""
    outputs = 1 if cfg.output == "continuous" else 2
    return UNet(cfg.channels, cfg.res_blocks, cfg.dropout, outputs, 10 if cfg.conditional else 0)


def from_authors(state):
    """A state_dict of the authors' BFN module (`net.` + their names) -> this network's (their fixed features not)."""
    renames = [
        ("output_adapter.output_projection.", "output_projection."),
        (".resnet_block.", "."),
        ("attn_block.layers.0.", "attn_block.norm."),
        ("attn_block.layers.1.", "attn_block.qkv."),
        ("attn_block.layers.3.", "attn_block.proj_out."),
    ]
    ours = {}
    for name, tensor in state.items():
        name = name.removeprefix("net.")
        for old, new in renames:
            name = name.replace(old, new)
        if not name.startswith("input_adapter."):
            ours[name] = tensor
    return ours


# ----------------------------------------------------------------------------------------------------------------------
# BFN: the network as the output distribution of continuous (§4.6) or discretised (§5.3) data, the losses, the test
# bound and the samplers.


def output(net, mu, t, cfg, runtime, labels=None):
    """p_O's parameters in float32: x_hat (B, 3, 32, 32) (continuous) or (mu_x, sigma_x) (discretised); labels (B,)."""
    with runtime.autocast:
        out = net(mu, t, labels)
    out = out.float()  # (B, 1 or 2, 3, H, W)
    if cfg.output == "continuous":
        return common.continuous_x_hat(mu, t, out[:, 0], cfg.sigma_1)
    return common.discretised_output(mu, t, out[:, 0], out[:, 1], cfg.sigma_1)


def loss_inf(x, out, t, cfg):
    """L^inf (§4.12 or §5.5) of x (B, 3, 32, 32) given the output at t. (B,) nats/image."""
    if cfg.output == "continuous":
        return common.continuous_loss_inf(x, out, t, cfg.sigma_1)
    return common.discretised_loss_inf(x, common.discretised_k_hat(*out, cfg.bins), t, cfg.sigma_1)


def loss_n(x, out, i, n, cfg, generator):
    """L^n (§4.10 or §5.4) of x (B, 3, 32, 32) given the output at t_{i-1}. (B,) nats/image."""
    if cfg.output == "continuous":
        return common.continuous_loss_n(x, out, i, n, cfg.sigma_1)
    log_probs = common.discretised_log_probs(*out, cfg.bins)
    return common.discretised_loss_n(x, log_probs, i, n, cfg.sigma_1, generator)


def recon_loss(x, out, cfg):
    """L^r (§4.13, §5.6) of x (B, 3, 32, 32) at t = 1, (B,); x_hat under N(x_hat, s^2), s = sigma_1 (16 bins: 0.7x)."""
    if cfg.output == "continuous":
        std = cfg.sigma_1 if cfg.bins == 256 else 0.7 * cfg.sigma_1
        return common.continuous_recon_loss(x, out, std, cfg.bins)
    return common.discretised_recon_loss(x, *out, cfg.bins)


def drop_labels(labels, p_null=0.1):
    """Labels (B,), p_null of them the null label 10: p(x | class) and p(x) in one network (Ho and Salimans, 2022)."""
    if labels is None:
        return None
    null = torch.rand(len(labels), device=labels.device) < p_null
    return torch.where(null, 10, labels)


def train_loss(net, batch, cfg, runtime):
    """L^inf (Algorithms 2, 5) of a batch (x (B, 3, 32, 32), labels or None): t ~ U(0, 1), mu ~ p_F. (B,) nats."""
    x, labels = batch
    t = common.training_times(len(x), cfg.t_draw == "stratified", device=x.device)
    mu = common.continuous_flow(x, t, cfg.sigma_1)
    return loss_inf(x, output(net, mu, t, cfg, runtime, drop_labels(labels)), t, cfg)


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
    """The test bound -ln p(x) <= L^n + L^r for each --eval-n (inf: L^inf), first --eval-examples, --eval-repeats."""
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    images = data["test"][: cfg.eval_examples or None]

    def output_at(x, t):  # the output at mu ~ p_F(. | x; t)
        mu = common.continuous_flow(x, t, cfg.sigma_1, generator)
        return output(net, mu, t, cfg, runtime)

    losses = {n: [] for n in cfg.eval_n}
    recon = []
    for _ in range(cfg.eval_repeats):
        for start in range(0, len(images), cfg.batch_size):
            x = as_data(images[start : start + cfg.batch_size], cfg)
            recon.append(recon_loss(x, output_at(x, torch.ones(len(x), device=x.device)), cfg))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(len(x), generator=generator, device=x.device)
                    losses[n].append(loss_inf(x, output_at(x, t), t, cfg))
                else:
                    i = common.stratified_steps(int(n), len(x), generator, x.device)  # every step as often
                    losses[n].append(loss_n(x, output_at(x, (i - 1) / int(n)), i, int(n), cfg, generator))
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


SAMPLERS = {
    "continuous": {
        "paper": common.continuous_sample,
        "ode": common.continuous_sample_ode,
        "sde": common.continuous_sample_sde,
    },
    "discretised": {
        "paper": common.discretised_sample,
        "ode": common.discretised_sample_ode,
        "sde": common.discretised_sample_sde,
    },
}


def prediction(net, cfg, runtime, labels=None):
    """The network as the samplers take it: (mu, t) -> x_hat (continuous) or p_O over the bins; labels (B,) or None."""

    def predict(mu, t):
        out = output(net, mu, t, cfg, runtime, labels)
        if cfg.output == "continuous":
            return out
        return common.discretised_probs(*out, cfg.bins)

    return predict


@torch.no_grad()
def generate(predict, n, cfg, runtime, generator):
    """n images (n, 3, 32, 32) in [-1, 1] by the --sampler (Algorithm 3 or 6, ODE, SDE) from predict (prediction())."""
    sampler = SAMPLERS[cfg.output][cfg.sampler]
    shape = (n, 3, 32, 32)
    if cfg.output == "continuous":
        return sampler(predict, shape, cfg.sample_steps, cfg.sigma_1, generator=generator, device=runtime.device)
    return sampler(predict, shape, cfg.sample_steps, cfg.sigma_1, cfg.bins, generator=generator, device=runtime.device)


# ----------------------------------------------------------------------------------------------------------------------
# Figures: grids and animations of samples, and the samples themselves for benchmarks/score_samples.py.


def recording(predict, trajectory, cfg, rows=8):
    """predict, appending each call's t, mu and prediction (x_hat, or p_O's mean bin) of `rows` images to trajectory."""

    def call(mu, t):
        out = predict(mu, t)
        shown = out[:rows]
        if cfg.output == "discretised":
            shown = shown @ common.bin_centres(cfg.bins, device=out.device)
        trajectory.append({"t": t[0].item(), "input": mu[:rows], "output": shown})
        return out

    return call


def save_samples(x, labels, cfg, name):
    """Samples (N, 3, 32, 32) in [-1, 1], classes (N,) or None, and the settings, for benchmarks/score_samples.py."""
    labels = None if labels is None else labels.cpu()
    saved = {"samples": x.float().cpu(), "labels": labels, "script": SCRIPT, "config": dataclasses.asdict(cfg)}
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


def as_image(x):
    """[-1, 1] -> [0, 1], for image files."""
    return (x.clamp(-1, 1) + 1) / 2


@torch.no_grad()
def write_samples(net, cfg, runtime):
    """samples.png (conditional: a row per class), samples-SAMPLER-STEPS.pt, evolution.png (4 samples: mu, then x_hat
    or k_hat, at t = 0, 0.1, ..., 1) and evolution.gif (every network call, 8 samples)."""
    from torchvision.utils import save_image

    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    n = cfg.num_samples
    nrow = max(1, round(math.sqrt(n)))
    labels = None
    if cfg.conditional:  # each class in turn, a row each
        nrow = max(1, n // 10)
        labels = torch.arange(10, device=runtime.device).repeat_interleave(nrow)
        n = len(labels)
    trajectory = []
    batches = []
    for index in torch.arange(n).split(cfg.batch_size):
        predict = prediction(net, cfg, runtime, None if labels is None else labels[index])
        if index[0] == 0:
            predict = recording(predict, trajectory, cfg)
        batches.append(generate(predict, len(index), cfg, runtime, generator))
    x = torch.cat(batches)
    name = f"samples-{cfg.sampler}-{cfg.sample_steps}.pt"
    save_image(as_image(x), os.path.join(cfg.out_dir, "samples.png"), nrow=nrow, pad_value=1)
    save_samples(x, labels, cfg, name)
    times = [min(trajectory, key=lambda call: abs(call["t"] - k / 10)) for k in range(11)]  # t = 0, 0.1, ..., 1
    rows = []
    for b in range(min(4, len(x))):
        rows += [call["input"][b] for call in times] + [call["output"][b] for call in times]
    save_image(as_image(torch.stack(rows)), os.path.join(cfg.out_dir, "evolution.png"), nrow=11, pad_value=1)
    shown = min(8, len(x))  # evolution.gif: a frame per network call, mu above the prediction, then the samples
    frames = [as_image(torch.cat([call["input"][:shown], call["output"][:shown]])) for call in trajectory]
    frames.append(as_image(torch.cat([x[:shown], x[:shown]])))
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
