"""Bayesian Flow Network on dynamically binarised MNIST (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 2.

Trains the paper's U-Net with the continuous-time loss L^inf (Algorithm 8), evaluates the test negative
log-likelihood bound L^inf + L^r and L^n + L^r in nats/image, and samples with Algorithm 9.
`--digits 2` trains on 64x64 images of two MNIST digits side by side instead.

    python bfn_mnist.py                      # the paper's model and optimiser (≈25M parameters, batch 512)
    torchrun --nproc_per_node=8 bfn_mnist.py --batch-size 64      # the same global batch on 8 GPUs
    python bfn_mnist.py --channels 32 --res-blocks 1 --dropout 0 --lr 1e-3 --batch-size 32 --steps 1600 \\
        --eval-every 0 --sample-every 0 --eval-examples 2000    # 8 minutes on 2 CPU cores: ≈93 nats/image, digits
    python bfn_mnist.py --eval-only --eval-n inf 10 25 50 100 784  # the paper's table, from runs/bfn_mnist/ckpt.pt

Paper: 77.87 nats/image (L^inf + L^r, test set); by steps n: 10 ≈ 95.2, 25 ≈ 84.4, 50 ≈ 81.1, 100 ≈ 79.5, 784 ≈ 78.0.
Measured with this script (README.md has the details): the quick command above, 1.06M parameters, 2 Xeon CPU
cores: 128 images/s, 7 min 45 s in all, test L^inf + L^r = 90.4 ± 0.7 nats/image (all 10,000, with --eval-only),
mostly recognisable digits in samples.png.

Outputs in --out-dir (default runs/bfn_mnist): log.txt, ckpt.pt, eval.json, samples.png (8x8 final samples;
4x4 for --digits 2) and evolution.png (for each of 4 samples, two rows: the input probability theta of a black
pixel, then the network's output probability, at t = 0, 0.1, ..., 1 left to right).
Shapes: B batch, H x W image (28 or 64), K = 2 classes (0 = white, 1 = black ink).
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import gzip
import json
import math
import os
import resource
import struct
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import discrete_flow, discrete_loss_inf, discrete_loss_n, discrete_recon_loss, discrete_sample, discrete_sample_ode

SCRIPT, UNIT = "bfn_mnist.py", "nats/image"

# ----------------------------------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (--batch-size for batch_size); defaults are the paper's.


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    data_dir: str = opt("data", "where MNIST is downloaded / found (torchvision's layout: DIR/MNIST/raw/*.gz)")
    digits: int = opt(1, "1: 28x28 MNIST; 2: 64x64 images of two digits side by side")
    # BFN
    beta_1: float = opt(9.0, "final accuracy beta(1) of the discrete schedule beta(t) = beta(1) t^2 (§6.8)")
    # network
    channels: int = opt(128, "U-Net base channels")
    res_blocks: int = opt(2, "residual blocks per U-Net level")
    dropout: float = opt(0.5, "dropout in the residual blocks")
    # optimisation
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)")
    batch_size: int = opt(512, "examples per process per micro-batch (global batch: batch size x grad accum x processes)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    lr: float = opt(1e-4, "AdamW learning rate (constant)")
    betas: tuple = opt((0.9, 0.98), "AdamW betas")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(5.0, "clip the gradient norm to this")
    ema_decay: float = opt(0.9999, "EMA decay of the weights used to evaluate and sample (warmed up)")
    # evaluation and sampling
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test losses L^n + L^r ('inf': continuous time)")
    eval_examples: int = opt(0, "evaluate on the first N test images (0: all 10,000)")
    eval_batch_size: int = opt(500, "examples per evaluation batch")
    sample_steps: int = opt(100, "generation steps n of Algorithm 9")
    num_samples: int = opt(64, "images in samples.png")
    sampler: str = opt("paper", "paper: the paper's sampler; ode: the second-order probability-flow ODE solver (fast)")
    # run
    out_dir: str = opt("runs/bfn_mnist", "run directory: log.txt, ckpt.pt, eval.json, samples.png, evolution.png")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt")
    eval_only: bool = opt(False, "load <out-dir>/ckpt.pt, evaluate on the test set, exit")
    sample_only: bool = opt(False, "load <out-dir>/ckpt.pt, sample, exit")
    seed: int = opt(0, "everything random derives from it")
    device: str = opt("auto", "auto (cuda, mps, cpu), or a torch device such as cuda:0")
    dtype: str = opt("auto", "autocast dtype around the network: auto (bfloat16 on cuda), float32, bfloat16, float16")
    compile: bool = opt(False, "torch.compile the network for training")
    log_every: int = opt(100, "steps between log lines")
    eval_every: int = opt(5000, "steps between evaluations on the validation split (0: only at the end, on test)")
    sample_every: int = opt(5000, "steps between samples (0: only at the end)")
    ckpt_every: int = opt(1000, "steps between checkpoints")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.type is tuple:
            p.add_argument(flag, nargs="+", type=type(f.default[0]), default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, default=f.default, help=f.metadata["help"])
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
        (not 0 <= cfg.ema_decay < 1, f"--ema-decay must be in [0, 1), got {cfg.ema_decay}"),
        (len(cfg.betas) != 2, "--betas takes two numbers"),
        (any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n),
         f"--eval-n takes 'inf' or positive integers, got {' '.join(cfg.eval_n)}"),
        (cfg.eval_examples < 0 or cfg.eval_batch_size < 1, "--eval-examples must be >= 0 and --eval-batch-size >= 1"),
        (cfg.sample_steps < 1 or cfg.num_samples < 1, "--sample-steps and --num-samples must be >= 1"),
        (cfg.sampler not in ("paper", "ode"), f"--sampler must be paper or ode, got {cfg.sampler}"),
        (min(cfg.log_every, cfg.ckpt_every) < 1 or min(cfg.eval_every, cfg.sample_every) < 0,
         "--log-every and --ckpt-every must be >= 1, --eval-every and --sample-every >= 0"),
        (cfg.dtype not in ("auto", "float32", "bfloat16", "float16"), f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype}"),
        (cfg.eval_only and cfg.sample_only, "--eval-only and --sample-only exclude each other"),
    ]:
        if bad:
            p.error(message)
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Data: MNIST as uint8 tensors on the device; every read draws a fresh binarisation.

MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx_images(path):
    """An idx3 file of MNIST images (gzip's CRC-32 checks the bytes) -> (N, 28, 28) uint8."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    except (OSError, EOFError, struct.error) as e:
        raise SystemExit(f"{SCRIPT}: error: {path} is corrupt or truncated ({e}). Delete it and run again to re-download.")
    if magic != 2051 or len(raw) != 16 + n * rows * cols:
        raise SystemExit(f"{SCRIPT}: error: {path} is not an MNIST idx3 image file (magic {magic}, {len(raw)} bytes "
                         f"for {n}x{rows}x{cols}). Delete it and run again to re-download.")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, rows, cols)


def load_mnist(data_dir):
    """{train, test}: (N, 28, 28) uint8 in 0..255. Downloads with torchvision (MD5-checked) if the files are missing."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    if not all(os.path.exists(os.path.join(raw, f)) for f in MNIST_FILES["train"] + MNIST_FILES["test"]):
        import torchvision
        try:
            for train in (True, False):
                torchvision.datasets.MNIST(data_dir, train=train, download=True)
        except Exception as e:
            raise SystemExit(f"{SCRIPT}: error: downloading MNIST into {raw} failed ({e}). Check the network, or put "
                             f"the four MNIST .gz files there by hand.")
    return {split: read_idx_images(os.path.join(raw, files[0])) for split, files in MNIST_FILES.items()}


def two_digit_images(digits, n, seed):
    """n 64x64 images of two random digits side by side, each at a random vertical offset (0..36) and a horizontal
    jitter (0..4) within its half; deterministic given the seed. (N, 28, 28) -> (n, 64, 64) uint8."""
    g = torch.Generator().manual_seed(seed)
    canvas = torch.zeros(n, 64, 64, dtype=torch.uint8)
    for half in (0, 32):
        which = torch.randint(len(digits), (n,), generator=g)
        dy = torch.randint(0, 37, (n,), generator=g)
        dx = half + torch.randint(0, 5, (n,), generator=g)
        for y in range(37):
            for x in range(half, half + 5):
                m = (dy == y) & (dx == x)
                canvas[m, y:y + 28, x:x + 28] = digits[which[m]]
    return canvas


def load_data(cfg, device):
    """{train, val, test}: uint8 grey levels (N, H, W) on the device; train/val is a fixed 99% / 1% split."""
    mnist = load_mnist(cfg.data_dir)
    if cfg.digits == 2:
        mnist = {"train": two_digit_images(mnist["train"], 60_000, cfg.seed),
                 "test": two_digit_images(mnist["test"], 10_000, cfg.seed + 1)}
    perm = torch.randperm(len(mnist["train"]), generator=torch.Generator().manual_seed(0))
    n_val = len(perm) // 100  # 600 of 60,000
    return {"train": mnist["train"][perm[n_val:]].to(device), "val": mnist["train"][perm[:n_val]].to(device),
            "test": mnist["test"].to(device)}


def eval_examples(images, cfg):
    """The evaluation set: the first --eval-examples images of a split (all if 0)."""
    return images[:cfg.eval_examples or None]


def binarise(images, generator=None):
    """Dynamic binarisation: pixel = 1 with probability grey / 255, a fresh draw every time. (B, H, W) -> long."""
    return torch.bernoulli(images.float() / 255, generator=generator).long()


def get_batch(data, cfg):
    """A random training batch (B, H, W) of class indices; the global RNG is seeded per step."""
    idx = torch.randint(len(data), (cfg.batch_size,), device=data.device)
    return binarise(data[idx])


# ----------------------------------------------------------------------------------------------------------------------
# Network: the improved-diffusion U-Net of the paper's MNIST experiment (mults (1, 2, 2), attention in the middle).

def group_norm(c):
    return nn.GroupNorm(math.gcd(32, c), c)


def time_embedding(t, dim):
    """Sinusoidal features of 1000 t. (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = 1000 * t.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], -1)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, c_emb, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(c_emb, c_out)
        self.norm2, self.drop, self.conv2 = group_norm(c_out), nn.Dropout(dropout), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, c_emb) -> (B, c_out, H, W)
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))


class Attention(nn.Module):
    def __init__(self, c, heads=4):
        super().__init__()
        self.heads, self.norm = heads, group_norm(c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x, emb=None):  # (B, C, H, W) -> (B, C, H, W)
        qkv = rearrange(self.qkv(self.norm(x)), "b (three h d) y x -> three b h (y x) d", three=3, h=self.heads)
        h = F.scaled_dot_product_attention(*qkv.contiguous())  # contiguous: the fast CPU kernel needs it
        return x + self.proj(rearrange(h, "b h (y x) d -> b (h d) y x", y=x.shape[2]))


class Downsample(nn.Conv2d):
    def __init__(self, c):
        super().__init__(c, c, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return super().forward(x)


class Upsample(nn.Conv2d):
    def __init__(self, c):
        super().__init__(c, c, 3, padding=1)

    def forward(self, x, emb=None):
        return super().forward(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """Psi(theta, t): input 2 theta - 1 for the black class (B, 1, H, W) and t (B,); output one logit per pixel."""

    def __init__(self, channels=128, mults=(1, 2, 2), res_blocks=2, dropout=0.5, c_in=1, c_out=1):
        super().__init__()
        c_emb, ch = 4 * channels, channels
        self.channels = channels
        self.emb = nn.Sequential(nn.Linear(channels, c_emb), nn.SiLU(), nn.Linear(c_emb, c_emb))
        self.conv_in = nn.Conv2d(c_in, ch, 3, padding=1)
        skips, self.down = [ch], nn.ModuleList()
        for level, mult in enumerate(mults):
            for _ in range(res_blocks):
                self.down.append(ResBlock(ch, channels * mult, c_emb, dropout))
                ch = channels * mult
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, c_emb, dropout), Attention(ch), ResBlock(ch, ch, c_emb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), channels * mult, c_emb, dropout))
                ch = channels * mult
            if level > 0:
                self.up.append(Upsample(ch))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, c_out, 3, padding=1))
        # initialisation: every residual branch and the output start at zero, so the untrained network outputs 0
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight), nn.init.zeros_(m.conv2.bias)
            if isinstance(m, Attention):
                nn.init.zeros_(m.proj.weight), nn.init.zeros_(m.proj.bias)
        nn.init.zeros_(self.out[-1].weight), nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):  # (B, c_in, H, W), (B,) -> (B, c_out, H, W)
        emb = self.emb(time_embedding(t, self.channels))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], 1), emb) if isinstance(layer, ResBlock) else layer(h, emb)
        return self.out(h)


# ----------------------------------------------------------------------------------------------------------------------
# BFN glue: the network as the output distribution p_O(. | theta, t) of discrete data (§6.4), and the losses.

def output_probs(net, theta, t, autocast):
    """p_O(k | theta, t) from one logit per pixel: theta (B, H, W, 2), t (B,) -> probs (B, H, W, 2)."""
    with autocast:
        logit = net((2 * theta[..., 1] - 1)[:, None], t)  # (B, 1, H, W)
    p = torch.sigmoid(logit.float()[:, 0])  # the probability of black, in float32
    return torch.stack([1 - p, p], -1)


def train_loss(net, x, cfg, autocast):
    """L^inf (§6.7, Algorithm 8) of a batch x (B, H, W): t ~ U(0, 1), theta ~ p_F(. | x; t). Returns (B,) nats/image."""
    t = torch.rand(len(x), device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, 2)
    return discrete_loss_inf(x, output_probs(net, theta, t, autocast), t, cfg.beta_1)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and sampling (with the EMA network)

@torch.no_grad()
def evaluate(net, images, cfg, autocast, seed):
    """Test bound -ln p(x) <= L^n + L^r for each n in --eval-n, in nats/image, one fresh binarisation per image."""
    g = torch.Generator(images.device).manual_seed(seed)
    losses, recon = {n: [] for n in cfg.eval_n}, []
    for batch in images.split(cfg.eval_batch_size):
        x, B = binarise(batch, g), len(batch)
        ones = torch.ones(B, device=x.device)
        recon.append(discrete_recon_loss(x, output_probs(net, discrete_flow(x, ones, cfg.beta_1, 2, g), ones, autocast)))
        for n in cfg.eval_n:
            if n == "inf":
                t = torch.rand(B, generator=g, device=x.device)
                probs = output_probs(net, discrete_flow(x, t, cfg.beta_1, 2, g), t, autocast)
                losses[n].append(discrete_loss_inf(x, probs, t, cfg.beta_1))
            else:
                i = torch.randint(1, int(n) + 1, (B,), generator=g, device=x.device)
                t = (i - 1) / int(n)
                probs = output_probs(net, discrete_flow(x, t, cfg.beta_1, 2, g), t, autocast)
                losses[n].append(discrete_loss_n(x, probs, i, int(n), cfg.beta_1, g))
    recon = torch.cat(recon).double()
    result = {}
    for n, v in losses.items():
        total = torch.cat(v).double() + recon
        result[n] = {"loss": (total - recon).mean().item(), "recon": recon.mean().item(), "total": total.mean().item(),
                     "stderr": (total.std() / math.sqrt(len(total))).item() if len(total) > 1 else float("nan")}
    return result


@torch.no_grad()
def sample(net, cfg, autocast, device, out_dir):
    """Algorithm 9 (or the ODE solver): samples.png (a grid of final samples) and evolution.png (theta and p_O at t = 0, 0.1, ..., 1)."""
    from torchvision.utils import save_image
    size = 28 if cfg.digits == 1 else 64
    g = torch.Generator(device).manual_seed(cfg.seed)
    sampler = discrete_sample if cfg.sampler == "paper" else discrete_sample_ode
    x, trajectory = sampler(lambda theta, t: output_probs(net, theta, t, autocast), (cfg.num_samples, size, size),
                            cfg.sample_steps, cfg.beta_1, 2, generator=g, device=device, return_trajectory=True)
    nrow = max(1, round(math.sqrt(cfg.num_samples)))
    save_image(1 - x[:, None].float(), os.path.join(out_dir, "samples.png"), nrow=nrow, pad_value=0.5)
    times = [k / 10 for k in range(11)]
    steps = [min(trajectory, key=lambda s: abs(s["t"] - tt)) for tt in times]
    rows = []
    for b in range(min(4, cfg.num_samples)):
        rows += [s["input"][b, ..., 1] for s in steps] + [s["output"][b, ..., 1] for s in steps]
    save_image(1 - torch.stack(rows)[:, None], os.path.join(out_dir, "evolution.png"), nrow=len(times), pad_value=0.5)


# ----------------------------------------------------------------------------------------------------------------------
# Training: one plain loop. DDP when launched by torchrun; rank 0 logs, evaluates, samples and writes files.

def save_checkpoint(path, **state):
    """Write to a temporary file, then rename: a crash mid-write leaves the previous checkpoint intact."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS (Linux: KiB)


def train(cfg):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, local_rank, world = 0, 0, 1
    if ddp:
        backend = "nccl" if torch.cuda.is_available() and cfg.device in ("auto", "cuda") else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=1))  # the others wait while rank 0 evaluates
        rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if cfg.device == "auto":
        cfg.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, cfg.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    def log(line):
        if master:
            print(line, flush=True)
            with open(os.path.join(cfg.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")

    data = load_data(cfg, device)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = UNet(cfg.channels, (1, 2, 2), cfg.res_blocks, cfg.dropout).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    decay = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # not biases, norms, embeddings
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=cfg.betas)
    step = 0
    if cfg.resume or cfg.eval_only or cfg.sample_only:
        if not os.path.exists(ckpt_path):
            raise SystemExit(f"{SCRIPT}: error: no checkpoint at {ckpt_path} to resume, evaluate or sample from")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"]), ema.load_state_dict(ckpt["ema"]), optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    log(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | device {device} | processes {world} | "
        f"data {tuple(data['train'].shape)} train, {tuple(data['val'].shape)} val, {tuple(data['test'].shape)} test | step {step}")

    def run_eval(split, step):
        examples = eval_examples(data[split], cfg)
        result = evaluate(ema, examples, cfg, autocast, seed=hash((cfg.seed, -1, step)) % 2 ** 62)
        log(f"eval {split} step {step} | " + " | ".join(
            f"L^{n}+L^r {r['total']:.3f} ± {r['stderr']:.3f} (L^r {r['recon']:.3f})" for n, r in result.items()) + f" {UNIT}")
        with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
            json.dump({"step": step, "split": split, "unit": UNIT, "examples": len(examples), "n": result}, f, indent=1)

    if cfg.eval_only or cfg.sample_only:
        if master:
            run_eval("test", step) if cfg.eval_only else sample(ema, cfg, autocast, device, cfg.out_dir)
        return

    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    net = torch.compile(net) if cfg.compile else net
    loss_sum, t0, last_step = torch.zeros((), device=device), time.time(), step
    while step < cfg.steps:
        torch.manual_seed(hash((cfg.seed, rank, step)) % 2 ** 62)  # the batch, t and noise depend only on seed, rank, step
        model.train()
        step_loss = torch.zeros((), device=device)
        for k in range(cfg.grad_accum):
            x = get_batch(data["train"], cfg)
            sync = not ddp or k == cfg.grad_accum - 1
            with (net.no_sync() if not sync and hasattr(net, "no_sync") else contextlib.nullcontext()):
                loss = train_loss(net, x, cfg, autocast).mean() / cfg.grad_accum
                loss.backward()
            step_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        bad = (~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)).float()  # NaN guard, agreed by all processes
        if ddp:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            log(f"non-finite loss or gradient at step {step + 1} (loss {step_loss.item()}, grad norm {grad_norm.item()}): "
                f"stopping; the last good checkpoint {ckpt_path} is untouched")
            raise SystemExit(f"{SCRIPT}: error: non-finite loss at step {step + 1}")
        loss_sum += step_loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        with torch.no_grad():  # EMA with warm-up: the effective decay grows towards --ema-decay
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt = time.time() - t0
            n = step - last_step
            log(f"step {step} | loss {loss_sum.item() / n:.2f} {UNIT} | {n * cfg.batch_size * cfg.grad_accum * world / dt:.1f} examples/s | "
                f"{1000 * dt / n:.0f} ms/step | peak mem {peak_memory_mb(device):.0f} MB | ETA {(cfg.steps - step) * dt / n / 60:.1f} min")
            loss_sum.zero_()
            t0, last_step = time.time(), step
        if master and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                            step=step, config=dataclasses.asdict(cfg),
                            rng={"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None})
        t_side = time.time()  # evaluation and sampling time is left out of examples/s
        if master and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval("val", step)
        if master and cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
            sample(ema, cfg, autocast, device, cfg.out_dir)
        t0 += time.time() - t_side
    if master:
        run_eval("test", step)
        sample(ema, cfg, autocast, device, cfg.out_dir)
        log(f"done: {cfg.out_dir}")
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
