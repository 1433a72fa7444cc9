"""Bayesian Flow Network on dynamically binarised MNIST (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 2.

Trains the authors' U-Net with the continuous-time loss L^inf (Algorithm 8), evaluates the test bound L^inf + L^r and
L^n + L^r in nats/image (the paper: 77.87), and samples with Algorithm 9 or the ODE or SDE solver of common.py.
Writes log.txt, ckpt.pt, eval.json, samples.png and evolution.png/.gif (theta and p_O over time) to --out-dir.

    python bfn_mnist.py --preset quick                    # a small U-Net, minutes on a laptop CPU
    python bfn_mnist.py                                   # the paper's model and optimiser
    torchrun --nproc_per_node=8 bfn_mnist.py --batch-size 64       # the paper's global batch on 8 GPUs
    python bfn_mnist.py --eval-only --eval-n inf 10 25 50 100 784   # the paper's table, from the run directory
    python bfn_mnist.py --sample-only --sampler ode sde --sample-steps 10 --eval-samples 1000   # fast, and scored
    python bfn_mnist.py --sample-only --inpaint bottom --particles 8       # complete the lower half of test digits
    python bfn_mnist.py --sample-only --grad-guidance 2 --sample-class 3   # steer any model towards a digit
    python bfn_mnist.py --preset quick --conditional --steps 3000   # class-conditional, for --guidance
    python bfn_mnist.py --preset quick --digits 2 --steps 960   # 64x64 images of two digits side by side, 24 min

Shapes: B batch, H x W image (28 x 28; 64 x 64 with --digits 2), K = 2 classes (0 white, 1 black ink), C channels.
"""
import argparse, collections, contextlib, copy, ctypes, dataclasses, datetime, gzip, itertools, json, math, os, resource
import shlex, shutil, signal, struct, subprocess, sys, threading, time, zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import discrete_flow, discrete_guided_probs, discrete_loss_inf, discrete_loss_n, discrete_recon_loss, \
    discrete_sample, discrete_sample_ode, discrete_sample_sde, stratified_steps

SCRIPT, UNIT, K = "bfn_mnist.py", "nats/image", 2  # K: white and black pixels


def opt(default, help, fixed=False, **accepts):
    """A setting: default, --help, whether it fixes the model or the data (a checkpoint keeps it), and the values it
    accepts (choices=(...), low: at least, high: below)."""
    return dataclasses.field(default=default, metadata={"help": help, "fixed": fixed, **accepts})


@dataclasses.dataclass
class Config:
    """Every setting of a run, each a flag (--batch-size for batch_size); the defaults are the paper's."""
    data_dir: str = opt("data", "where MNIST is, or is downloaded to (torchvision's layout: DIR/MNIST/raw)")
    digits: int = opt(1, "1: 28x28 MNIST; 2: 64x64 images of two digits side by side", True, choices=(1, 2))
    conditional: bool = opt(False, "the network also sees the label (the digit, or the number 00-99)", True)
    beta_1: float = opt(9.0, "final accuracy beta(1) of the schedule beta(t) = beta(1) t^2 (§6.8)", True, low=1e-9)
    channels: int = opt(128, "U-Net base channels (a multiple of 8)", True, low=8)
    res_blocks: int = opt(2, "residual blocks per U-Net level", True, low=1)
    norm_groups: int = opt(32, "GroupNorm groups, at most (32: the authors')", True, low=1)
    dropout: float = opt(0.5, "dropout in the residual blocks", low=0, high=1)
    label_drop: float = opt(0.1, "with --conditional: the fraction of training labels replaced by none", low=0, high=1)
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)", low=0)
    batch_size: int = opt(512, "examples per process and step (global: x --grad-accum x processes)", low=1)
    grad_accum: int = opt(1, "batches accumulated per optimiser step", low=1)
    lr: float = opt(1e-4, "AdamW learning rate (the peak, with a schedule)", low=1e-12)
    lr_warmup: int = opt(0, "steps of linear learning-rate warm-up (0: the paper's)", low=0)
    lr_decay: str = opt("none", "decay to --lr-final x --lr at --steps", choices=("none", "cosine", "linear"))
    lr_final: float = opt(0.1, "with --lr-decay: the final learning rate as a fraction of --lr", low=0, high=1)
    betas: tuple = opt((0.9, 0.98), "AdamW betas", low=0, high=1)
    weight_decay: float = opt(0.01, "AdamW weight decay (weights of linear and convolution layers)", low=0)
    grad_clip: float = opt(5.0, "clip the gradient norm to this", low=1e-12)
    ema_decay: float = opt(0.9999, "EMA decay of the weights that evaluate and sample (warmed up)", low=0, high=1)
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = opt(0, "evaluate on the first N test images (0: all)", low=0)
    eval_repeats: int = opt(1, "passes over them with fresh binarisations and noise", low=1)
    eval_batch_size: int = opt(500, "examples per evaluation and sampling batch", low=1)
    sampler: tuple = opt(("paper",), "Algorithm 9, or the second-order ODE or SDE solver; several: each",
                         choices=("paper", "ode", "sde"))
    sample_steps: tuple = opt((100,), "generation steps n; several: each", low=1)
    num_samples: int = opt(64, "images in samples.png, and test images completed by --inpaint", low=1)
    final: str = opt("sample", "the result at t = 1: a draw of p_O (the paper's) or its mode",
                     choices=("sample", "mode"))
    eval_samples: int = opt(0, "sample quality of N samples against N test images, through two classifiers", low=0)
    sample_class: tuple = opt(("all",), "with --conditional or --grad-guidance: the classes to sample, a row each")
    guidance: tuple = opt((0.0,), "with --conditional: classifier-free guidance weight; several: each", low=-1)
    grad_guidance: tuple = opt((0.0,), "guidance of any model by the gradient of a classifier of theta; several: each",
                               low=0)
    inpaint: str = opt("", "complete test images: top, bottom, left, right, centre, or a mask image (white: generate)")
    particles: int = opt(1, "with --inpaint: sequential Monte Carlo over P particles (1: replacement)", low=1)
    preset: str = opt("paper", "the paper's settings, or a small CPU recipe; flags given win",
                      choices=("paper", "quick"))
    out_dir: str = opt("runs/bfn_mnist", "the run directory")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt with its settings (flags given change them)")
    init_from: str = opt("", "start from the weights of another run's ckpt.pt or an authors' checkpoint")
    eval_only: bool = opt(False, "evaluate the checkpoint in <out-dir> on the test set")
    sample_only: bool = opt(False, "sample from the checkpoint in <out-dir>")
    seed: int = opt(0, "everything random derives from it")
    device: str = opt("auto", "auto (cuda, mps or cpu), cpu, cuda (this process's GPU), cuda:N or mps")
    dtype: str = opt("auto", "autocast dtype (auto: bfloat16 on cuda)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = opt(False, "torch.compile the network for training")
    log_every: int = opt(100, "steps between log lines", low=1)
    eval_every: int = opt(5000, "steps between evaluations on the validation split (0: only at the end)", low=0)
    sample_every: int = opt(5000, "steps between samples (0: only at the end)", low=0)
    ckpt_every: int = opt(1000, "steps between checkpoints", low=1)


PRESETS = {"paper": {}, "quick": dict(channels=32, res_blocks=1, dropout=0.0, lr=1e-3, lr_warmup=100, lr_decay="cosine",
                                      batch_size=32, steps=1600, eval_every=0, sample_every=0, eval_examples=2000)}
INPAINT_REGIONS = ("top", "bottom", "left", "right", "centre")


def check(cfg):
    """The settings that depend on each other -> (cfg, with every class for --grad-guidance without --sample-class;
    the problems, each a one-line message)."""
    classes = 10 ** cfg.digits
    if any(cfg.grad_guidance) and cfg.sample_class == ("all",) and not cfg.conditional:
        cfg = dataclasses.replace(cfg, sample_class=tuple(map(str, range(classes))))
    return cfg, [message for bad, message in [
        (cfg.channels % 8 != 0, f"--channels must be a multiple of 8, got {cfg.channels}"),
        (any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n),
         f"--eval-n takes inf or positive integers, got {' '.join(cfg.eval_n)}"),
        (cfg.eval_samples == 1 or len(cfg.betas) != 2, "--eval-samples must be 0 or >= 2; --betas takes two numbers"),
        (cfg.conditional and cfg.norm_groups % (2 * cfg.channels) == 0, "--conditional needs a U-Net level with more "
         "channels than GroupNorm groups, or the normalisation erases the label: raise --channels"),
        (any(cfg.guidance) and not cfg.conditional, "--guidance needs a --conditional model"),
        (cfg.sample_class != ("all",) and not (cfg.conditional or any(cfg.grad_guidance)),
         "--sample-class needs a --conditional model or --grad-guidance"),
        (any(c != "all" and not (c.isdigit() and int(c) < classes) for c in cfg.sample_class),
         f"--sample-class takes all or classes 0..{classes - 1}, got {' '.join(cfg.sample_class)}"),
        (cfg.inpaint not in ("", *INPAINT_REGIONS) and not os.path.isfile(cfg.inpaint),
         f"--inpaint takes {', '.join(INPAINT_REGIONS)} or a mask image, and {cfg.inpaint} is neither (no such file)"),
        (cfg.particles > 1 and not cfg.inpaint, "--particles is for --inpaint"),
        (cfg.particles > 1 and "ode" in cfg.sampler, "--particles needs a stochastic sampler (paper, sde): the ODE "
         "solver is deterministic after its first draw, so there is nothing to reweight"),
        (cfg.eval_only and cfg.sample_only, "--eval-only and --sample-only exclude each other"),
        (cfg.resume and bool(cfg.init_from), "--resume and --init-from exclude each other")] if bad]


# ----------------------------------------------------------------------------------------------------------------------
# Data: MNIST as uint8 tensors on the device; every read draws a fresh binarisation.

MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """An MNIST idx file (gzip's CRC-32 checks it): images (magic 2051) -> (N, 28, 28), labels (2049) -> (N,), uint8."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        dims = {2051: 3, 2049: 1}.get(struct.unpack(">I", raw[:4])[0], 0)
        shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
    except (OSError, EOFError, struct.error) as e:
        raise SystemExit(f"{SCRIPT}: error: {path} is corrupt or truncated ({e}). Delete it to download it afresh")
    if not dims or len(raw) != 4 + 4 * dims + math.prod(shape):
        raise SystemExit(f"{SCRIPT}: error: {path} is not an MNIST idx file. Delete it to download it afresh")
    return torch.frombuffer(bytearray(raw[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)


def load_mnist(data_dir):
    """{train, test}: ((N, 28, 28) images, (N,) labels), uint8. Missing files are downloaded by torchvision
    (MD5-checked) into data_dir; a --data-dir that does not exist is refused; a failed download leaves no folder."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    paths = {split: [os.path.join(raw, name) for name in names] for split, names in MNIST_FILES.items()}
    if not all(os.path.exists(path) for split in paths.values() for path in split):
        if data_dir != Config.data_dir and not os.path.isdir(data_dir):
            raise SystemExit(f"{SCRIPT}: error: --data-dir {data_dir} does not exist")
        made = next((d for d in (data_dir, os.path.join(data_dir, "MNIST")) if not os.path.exists(d)), None)
        try:
            import torchvision
            for train in (True, False):
                torchvision.datasets.MNIST(data_dir, train=train, download=True)
        except Exception as e:
            if made:
                shutil.rmtree(made, ignore_errors=True)
            raise SystemExit(f"{SCRIPT}: error: downloading MNIST (4 files, 11 MB) into {raw} failed ({e}); put them "
                             f"there by hand ({', '.join(n for names in MNIST_FILES.values() for n in names)})")
    return {split: (read_idx(images), read_idx(labels)) for split, (images, labels) in paths.items()}


def two_digit_images(digits, labels, n, seed):
    """n 64x64 images of two random digits side by side, each at a random vertical offset (0..36) and a horizontal
    jitter (0..4) within its half, and their labels, the numbers 10 left + right; deterministic given the seed.
    (N, 28, 28), (N,) -> (n, 64, 64) uint8, (n,) uint8."""
    g = torch.Generator().manual_seed(seed)
    canvas, number = torch.zeros(n, 64, 64, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    for half in (0, 32):
        which = torch.randint(len(digits), (n,), generator=g)
        number = 10 * number + labels[which]
        dy, dx = torch.randint(0, 37, (n,), generator=g), half + torch.randint(0, 5, (n,), generator=g)
        for y in range(37):
            for x in range(half, half + 5):
                m = (dy == y) & (dx == x)
                canvas[m, y:y + 28, x:x + 28] = digits[which[m]]
    return canvas, number


def load_data(cfg, device):
    """{train, val, test}: (N, H, W) uint8 grey levels, and {train, val, test}_labels: (N,) uint8 (the digit, or the
    number 00-99), on the device; train/val is a fixed 99% / 1% split of the training set."""
    mnist = load_mnist(cfg.data_dir)
    if cfg.digits == 2:
        mnist = {split: two_digit_images(*mnist[split], n, cfg.seed + k)
                 for k, (split, n) in enumerate([("train", 60_000), ("test", 10_000)])}
    perm = torch.randperm(len(mnist["train"][0]), generator=torch.Generator().manual_seed(0))
    n_val, data = len(perm) // 100, {}  # 600 of 60,000
    for split, (images, labels), idx in [("train", mnist["train"], perm[n_val:]), ("val", mnist["train"], perm[:n_val]),
                                         ("test", mnist["test"], slice(None))]:
        data[split], data[split + "_labels"] = images[idx].to(device), labels[idx].to(device)
    return data


def binarise(images, generator=None):
    """Dynamic binarisation: pixel = 1 with probability grey / 255, a fresh draw every time. (B, H, W) -> long."""
    return torch.bernoulli(images.float() / 255, generator=generator).long()


def get_batch(data, cfg):
    """A random training batch: (B, H, W) pixel classes and, with --conditional, the (B,) labels (else None)."""
    idx = torch.randint(len(data["train"]), (cfg.batch_size,), device=data["train"].device)
    return binarise(data["train"][idx]), data["train_labels"][idx].long() if cfg.conditional else None


def evaluation_set(images, cfg):
    """The first --eval-examples images of a split (all if 0). (N, H, W) uint8."""
    return images[:cfg.eval_examples or None]


def to_unit(nats, cfg):
    """Nats per example -> the paper's unit (nats/image: unchanged)."""
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
        self.out_layers = nn.Sequential(group_norm(c_out, groups), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, c_emb) -> (B, c_out, H, W)
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]  # (B, c_out, H, W)
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions, with a residual connection; the qkv channels are laid out
    per head (q, k, v of head 0, then of head 1, ...), as in the authors' network."""

    def __init__(self, c, groups, heads=4):
        super().__init__()
        self.heads, self.norm = heads, group_norm(c, groups)
        self.qkv, self.proj_out = nn.Conv1d(c, 3 * c, 1), zero(nn.Conv1d(c, c, 1))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        h = x.flatten(2)  # (B, C, H W)
        qkv = rearrange(self.qkv(self.norm(h)), "b (h three d) s -> three b h s d", three=3, h=self.heads)
        h = F.scaled_dot_product_attention(*qkv.contiguous())  # (B, heads, H W, C / heads); contiguous: fast on CPU
        return x + self.proj_out(rearrange(h, "b h s d -> b (h d) s")).view_as(x)


def sequential(**layers):
    """Layers in turn under the authors' names: sequential(op=conv) holds op.weight (their Downsample), up and conv
    their Upsample (nearest-neighbour, then a convolution)."""
    return nn.Sequential(collections.OrderedDict(layers))


class Layers(nn.ModuleList):
    """Layers applied in turn, the residual blocks with the time embedding too."""

    def forward(self, h, emb):
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class UNet(nn.Module):
    """Psi(theta, t): the input 2 theta_0 - 1 (theta_0: the probability of a white pixel, the authors' convention)
    (B, H, W) and t (B,) -> the logit of a black pixel (B, H, W). Each pixel's [2 theta_0 - 1, 2 t - 1] is projected to
    `channels` features, which a linear layer reads with the U-Net's output to give the logit. With classes > 0, a
    label y (B,) in 0..classes (classes, or None: no label) adds an embedding to the time embedding (embed_label);
    with classes = 0 and groups = 32 it is the authors' network."""

    def __init__(self, channels=128, mults=(1, 2, 2), res_blocks=2, dropout=0.5, classes=0, groups=32):
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
                self.input_blocks.append(Layers([ResBlock(ch, channels * mult, c_emb, dropout, groups)]))
                ch = channels * mult
                skips.append(ch)
            if level < len(mults) - 1:
                self.input_blocks.append(Layers([sequential(op=nn.Conv2d(ch, ch, 3, stride=2, padding=1))]))
                skips.append(ch)
        self.middle_block = Layers([ResBlock(ch, ch, c_emb, dropout, groups), Attention(ch, groups),
                                    ResBlock(ch, ch, c_emb, dropout, groups)])
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(res_blocks + 1):
                layers = Layers([ResBlock(ch + skips.pop(), channels * mult, c_emb, dropout, groups)])
                ch = channels * mult
                if level > 0 and i == res_blocks:
                    layers.append(sequential(up=nn.Upsample(scale_factor=2), conv=nn.Conv2d(ch, ch, 3, padding=1)))
                self.output_blocks.append(layers)
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), zero(nn.Conv2d(ch, channels, 3, padding=1)))
        self.output_projection = nn.Linear(2 * channels, 1)

    def forward(self, x, t, y=None):  # (B, H, W), (B,), (B,) or None -> (B, H, W)
        features = torch.stack([x, (2 * t - 1)[:, None, None].expand_as(x)], -1)  # (B, H, W, 2)
        x = self.input_projection(features)  # (B, H, W, channels)
        emb = self.time_embed(time_embedding(t, self.channels))  # (B, 4 channels)
        if self.classes:
            emb = emb + self.embed_label(torch.full_like(t, self.classes, dtype=torch.long) if y is None else y)
        h, hs = x.permute(0, 3, 1, 2).contiguous(), []  # (B, channels, H, W); contiguous: GroupNorm is slow otherwise
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


# ----------------------------------------------------------------------------------------------------------------------
# BFN: the network as the output distribution of discrete data (§6.4), the loss, the test bound and the draw.

def output_log_probs(net, theta, t, ctx, y=None):
    """ln p_O(k | theta, t) from one logit per pixel (given labels y (B,) for a conditional network), as log-sigmoids in
    float32, exact for confident pixels: theta (B, H, W, 2), t (B,) -> (B, H, W, 2)."""
    with ctx.autocast:
        logit = net(2 * theta[..., 0] - 1, t) if y is None else net(2 * theta[..., 0] - 1, t, y)  # (B, H, W)
    logit = logit.float()  # the log-odds of black
    return torch.stack([F.logsigmoid(-logit), F.logsigmoid(logit)], -1)


def train_loss(net, batch, cfg, ctx):
    """L^inf (§6.7, Algorithm 8) of a batch (x (B, H, W), labels (B,) or None): t ~ U(0, 1), theta ~ p_F(. | x; t).
    (B,) nats/image."""
    x, y = batch
    t = torch.rand(len(x), device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, K)
    return discrete_loss_inf(x, output_log_probs(net, theta, t, ctx, drop_labels(y, cfg)).exp(), t, cfg.beta_1)


@torch.no_grad()
def evaluate(net, images, cfg, ctx, seed):
    """The test bound -ln p(x) <= L^n + L^r (§6.6, §6.9) for each n in --eval-n (inf: L^inf, §6.7), over
    --eval-repeats passes with fresh binarisations and noise; the steps i of L^n stratified over the examples.
    images (N, H, W) uint8 -> {n: {loss, recon, total, stderr}} in nats/image."""
    g = torch.Generator(images.device).manual_seed(seed)
    log_p = lambda x, t: output_log_probs(net, discrete_flow(x, t, cfg.beta_1, K, g), t, ctx)  # noqa: E731
    losses, recon = {n: [] for n in cfg.eval_n}, []
    progress = Progress("evaluating", cfg.eval_repeats * math.ceil(len(images) / cfg.eval_batch_size))
    for _ in range(cfg.eval_repeats):
        steps = {n: stratified_steps(int(n), len(images), g, images.device) for n in cfg.eval_n if n != "inf"}
        for start in range(0, len(images), cfg.eval_batch_size):
            progress.tick()
            x = binarise(images[start:start + cfg.eval_batch_size], g)
            recon.append(discrete_recon_loss(x, log_p(x, torch.ones(len(x), device=x.device))))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(len(x), generator=g, device=x.device)
                    losses[n].append(discrete_loss_inf(x, log_p(x, t).exp(), t, cfg.beta_1))
                else:
                    i = steps[n][start:start + len(x)]
                    losses[n].append(discrete_loss_n(x, log_p(x, (i - 1) / int(n)), i, int(n), cfg.beta_1, g))
    return summarise(losses, recon, cfg)


@torch.no_grad()
def draw(net, n, cfg, ctx, generator, trajectory=False, known=None, labels=None):
    """n samples (n, H, W) of the --sampler (Algorithm 9, or the ODE or SDE solver) at --sample-steps, in batches of
    --eval-batch-size; with trajectory, one batch, and its trajectory (theta and p_O at each network call). known
    (n, H, W): pixels to condition on, -1 where unknown (with --particles; common.py, Conditioning); labels (n,): the
    class of each sample, for --guidance and --grad-guidance."""
    sampler = {"paper": discrete_sample, "ode": discrete_sample_ode, "sde": discrete_sample_sde}[cfg.sampler]
    particles = cfg.particles if known is not None else 1
    guide = train_classifier(cfg, ctx, "guide") if cfg.grad_guidance and labels is not None else None
    chunks = [torch.arange(n)] if trajectory else torch.arange(n).split(max(1, cfg.eval_batch_size // particles))
    progress = Progress(f"sampling ({cfg.sampler}, {cfg.sample_steps} steps)", len(chunks) * (cfg.sample_steps + 1))

    def run(idx):
        y = None if labels is None else labels[idx].repeat_interleave(particles)
        probs_fn = lambda theta, t: progress.tick() or guided_probs(net, theta, t, y, cfg, ctx, guide)  # noqa: E731
        size = 28 if cfg.digits == 1 else 64
        return sampler(probs_fn, (len(idx), size, size), cfg.sample_steps, cfg.beta_1, K, generator=generator,
                       device=ctx.device, return_trajectory=trajectory, final_mode=cfg.final == "mode",
                       known=None if known is None else known[idx], **{"particles": particles} if particles > 1 else {})

    out = [run(idx) for idx in chunks]
    return out[0] if trajectory else torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# Beyond the paper: classifier-free guidance of a conditional network, gradient guidance of any network through a
# classifier of the input theta, and inpainting.

def drop_labels(y, cfg):
    """Training labels (B,) with a fraction --label-drop replaced by the null label, so that one network learns both
    p(x | class) and p(x); None (unconditional) stays None."""
    if y is None:
        return None
    return torch.where(torch.rand(len(y), device=y.device) < cfg.label_drop, 10 ** cfg.digits, y)


def guided_probs(net, theta, t, y, cfg, ctx, guide=None):
    """p_O(. | theta, t) for sampling, given labels y (B,) (or None). A conditional network predicts for the class,
    with classifier-free guidance w = --guidance (Ho and Salimans, arXiv:2207.12598) from one call on the class and the
    null label together: (1 + w) p_O(. | y) - w p_O(. | null), which the ODE and SDE solvers use only in the mean update
    of theta's logits, so this guides those updates (and the paper's sampler draws from its positive part). With
    guide, a classifier of theta and t: p_O + w grad_y ln c(y | theta, t), w = --grad-guidance (common.py, Guidance)."""
    w = cfg.guidance if cfg.conditional and y is not None else 0
    if not w:
        probs = output_log_probs(net, theta, t, ctx, y if cfg.conditional else None).exp()
    else:
        null = torch.full_like(y, 10 ** cfg.digits)
        both = output_log_probs(net, theta.repeat(2, 1, 1, 1), t.repeat(2), ctx, torch.cat([y, null]))
        p_c, p_u = both.exp().chunk(2)
        probs = (1 + w) * p_c - w * p_u
    if guide is None:
        return probs
    with torch.enable_grad():
        th = theta.detach().requires_grad_()
        log_c = guide(guide_input(th[..., 1], t)).log_softmax(-1).gather(1, y[:, None]).sum()
        grad, = torch.autograd.grad(log_c, th)
    return discrete_guided_probs(probs, theta, grad, cfg.grad_guidance)


def guide_input(theta_black, t):
    """What the guidance classifier sees: [2 theta - 1, 2 t - 1] per pixel. (B, H, W), (B,) -> (B, 2, H, W)."""
    return torch.stack([2 * theta_black - 1, (2 * t - 1)[:, None, None].expand_as(theta_black)], 1)


class Classifier(nn.Module):
    """A small CNN: (B, c_in, H, W) -> (B, classes) logits; features(): its 128 penultimate features."""

    def __init__(self, c_in, classes, kernel=3, widths=(32, 64)):
        super().__init__()
        a, b = widths
        self.features = nn.Sequential(nn.Conv2d(c_in, a, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(a, b, kernel, padding=kernel // 2), nn.ReLU(), nn.AdaptiveAvgPool2d(7),
                                      nn.Flatten(), nn.Linear(49 * b, 128), nn.ReLU())
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.features(x))


CLASSIFIERS = {"a": (3, (32, 64), 0), "b": (5, (16, 32), 1), "guide": (3, (32, 64), 2)}  # kernel, widths, seed


def train_classifier(cfg, ctx, kind):
    """A classifier of this MNIST folder, trained once (Adam, 2 epochs) and cached next to the data. a and b, two
    feature networks of different shapes and seeds, score samples: binarised 28x28 digits -> 10 classes. guide sees
    the input theta of the Bayesian flow at a random t (guide_input) -> the label (the digit, or the number 00-99),
    for --grad-guidance; it never scores samples."""
    images, labels = load_mnist(cfg.data_dir)["train"]
    crc = zlib.crc32(labels.numpy().tobytes(), zlib.crc32(images.numpy().tobytes()))
    name = f"classifier-{kind}-{crc:08x}" + (f"-d{cfg.digits}-s{cfg.seed}-b{cfg.beta_1:g}" if kind == "guide" else "")
    path, (kernel, widths, seed) = os.path.join(cfg.data_dir, "MNIST", name + ".pt"), CLASSIFIERS[kind]
    torch.manual_seed(seed)
    clf = Classifier(2 if kind == "guide" else 1, 10 ** cfg.digits if kind == "guide" else 10, kernel, widths)
    if os.path.exists(path):
        clf.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return clf.to(ctx.device).eval()
    if kind == "guide" and cfg.digits == 2:
        images, labels = two_digit_images(images, labels, 60_000, cfg.seed)
    ctx.log(f"training classifier {kind} on {len(labels):,} images (once; cached as {path})")
    clf, g = clf.to(ctx.device), torch.Generator(ctx.device).manual_seed(seed)
    images, labels, optimizer = images.to(ctx.device), labels.long().to(ctx.device), torch.optim.Adam(clf.parameters())
    with torch.enable_grad():  # also when called from inside sampling code
        for idx in torch.cat([torch.randperm(len(images), generator=g, device=ctx.device) for _ in "12"]).split(128):
            x = binarise(images[idx], g)
            t = torch.rand(len(x), generator=g, device=x.device)
            inputs = guide_input(discrete_flow(x, t, cfg.beta_1, K, g)[..., 1], t) if kind == "guide" else x[:, None]
            loss = F.cross_entropy(clf(inputs.float()), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with contextlib.suppress(OSError):  # a read-only data folder: trained again next time
        torch.save(clf.state_dict(), path)
    return clf.eval()


def inpaint_mask(cfg, size, device):
    """--inpaint: (H, W) bool, True where pixels are generated: a half (top, bottom, left, right), the centre (the
    middle half each way), or the white pixels of a mask image of H x W pixels."""
    h, q, mask = size // 2, size // 4, torch.zeros(size, size, dtype=torch.bool)
    regions = {"top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None)), "left": (slice(None), slice(
        0, h)), "right": (slice(None), slice(h, None)), "centre": (slice(q, size - q), slice(q, size - q))}
    if cfg.inpaint in regions:
        mask[regions[cfg.inpaint]] = True
        return mask.to(device)
    from PIL import Image
    image = Image.open(cfg.inpaint).convert("L")
    if image.size != (size, size):
        raise SystemExit(f"{SCRIPT}: error: --inpaint {cfg.inpaint} is {image.size[0]}x{image.size[1]} pixels; the "
                         f"images are {size}x{size}")
    return (torch.tensor(list(image.getdata())).view(size, size) >= 128).to(device)


@torch.no_grad()
def complete(net, cfg, ctx, data, tag=""):
    """--inpaint: the first --num-samples test images completed where the mask says, given the rest (by replacement, or
    sequential Monte Carlo with --particles); inpaint.png shows each with the missing part grey, the completion and the
    original. For single digits, how many completions each classifier labels as the original's digit."""
    if not cfg.inpaint:
        return
    from torchvision.utils import save_image
    n, missing, start = cfg.num_samples, inpaint_mask(cfg, data["test"].shape[-1], ctx.device), time.time()
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 2)
    original = binarise(data["test"][:n], g)
    x = draw(net, n, cfg, ctx, g, known=torch.where(missing, -1, original))
    rows = torch.stack([torch.where(missing, 0.5, 1 - original.float()), 1 - x.float(), 1 - original.float()], 1)
    save_image(rows.flatten(0, 1)[:, None], os.path.join(cfg.out_dir, f"inpaint{tag}.png"),
               nrow=3 * max(1, round(math.sqrt(n) / 2)), pad_value=0.5)  # ink black, missing grey
    line = f"inpainting ({cfg.inpaint}, {cfg.sampler}, {cfg.sample_steps} steps, {cfg.particles} particles, " \
           f"{time.time() - start:.0f} s): {n} test images completed"
    if cfg.digits == 1:
        right = lambda k, x: (train_classifier(cfg, ctx, k)(x[:, None].float()).argmax(-1) ==  # noqa: E731
                              data["test_labels"][:n]).float().mean().item()
        line += ", labelled as the original's digit " + ", ".join(f"{right(k, x):.1%} by classifier {k} (originals "
                                                                   f"{right(k, original):.1%})" for k in "ab")
    ctx.log(line + f" | inpaint{tag}.png")


# ----------------------------------------------------------------------------------------------------------------------
# Figures and sample quality: grids and animations of samples; how digit-like, varied and on-class they are.

def sample_labels(cfg, n, device):
    """With --conditional or --sample-class: the class of each of about n samples, each --sample-class (all: every
    class) n / classes times (at least once) in turn, and the columns of a grid with a row per class. Otherwise: None
    and the columns of a square grid of n."""
    if not (cfg.conditional or cfg.sample_class != ("all",)):
        return None, max(1, round(math.sqrt(n)))
    classes = range(10 ** cfg.digits) if "all" in cfg.sample_class else [int(c) for c in cfg.sample_class]
    each = max(1, n // len(classes))
    labels = torch.tensor(list(classes), device=device).repeat_interleave(each)
    return labels, each if each > 1 else max(1, round(math.sqrt(len(labels))))


def save_gif(frames, nrow, path, max_frames=100):
    """An animated GIF of image grids, at most max_frames of them evenly spaced (the last one kept, and held):
    frames: a list of (N, C, H, W) in [0, 1]."""
    from PIL import Image
    from torchvision.utils import make_grid
    keep = sorted({round(k * (len(frames) - 1) / (max_frames - 1)) for k in range(max_frames)}) \
        if len(frames) > max_frames else range(len(frames))
    images = [Image.fromarray((make_grid(frames[k].float().cpu(), nrow=nrow, pad_value=0.5).clamp(0, 1) * 255)
                              .round().byte().permute(1, 2, 0).numpy()) for k in keep]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[80] * (len(images) - 1) + [2000], loop=0)


@torch.no_grad()
def sample(net, cfg, ctx, tag=""):
    """samples.png (a grid of samples; with labels a row per class), evolution.png (for 4 samples, two rows: theta of
    a black pixel, then p_O, at t = 0, 0.1, ..., 1) and evolution.gif (every network call, 8 samples)."""
    from torchvision.utils import save_image
    g = torch.Generator(ctx.device).manual_seed(cfg.seed)
    labels, nrow = sample_labels(cfg, cfg.num_samples, ctx.device)
    x, trajectory = draw(net, cfg.num_samples if labels is None else len(labels), cfg, ctx, g, True, labels=labels)
    save_image(1 - x[:, None].float(), os.path.join(cfg.out_dir, f"samples{tag}.png"), nrow=nrow, pad_value=0.5)
    steps = [min(trajectory, key=lambda s: abs(s["t"] - k / 10)) for k in range(11)]
    rows = [s[part][b, ..., 1] for b in range(min(4, len(x))) for part in ("input", "output") for s in steps]
    save_image(1 - torch.stack(rows)[:, None], os.path.join(cfg.out_dir, f"evolution{tag}.png"), nrow=11, pad_value=0.5)
    shown = min(8, len(x))  # evolution.gif: a frame per network call, theta above p_O, then the samples
    frames = [1 - torch.cat([s["input"][:shown, ..., 1], s["output"][:shown, ..., 1]])[:, None] for s in trajectory]
    save_gif(frames + [1 - torch.cat([x[:shown], x[:shown]]).float()[:, None]], shown,
             os.path.join(cfg.out_dir, f"evolution{tag}.gif"))
    ctx.log(f"samples: samples{tag}.png, evolution{tag}.png, evolution{tag}.gif")


def digit_crops(x):
    """The two digits of 64x64 images of two, each a 28x28 crop centred on its half's ink.
    (B, 64, 64) -> (2, B, 28, 28)."""
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
    """Features (N, D), labels (N,) and {confident: the fraction labelled with probability > 0.9, label_entropy_bits:
    the entropy of the label histogram} of binarised images x (N, H, W). Images of two digits are scored digit by digit
    (digit_crops): confident when both are, labelled with the number 00-99, their features side by side."""
    parts = digit_crops(x) if x.shape[-1] == 64 else x[None]  # (digits, N, 28, 28)
    logits = [torch.cat([clf(c[:, None].float()) for c in part.split(500)]) for part in parts]
    feats = torch.cat([torch.cat([clf.features(c[:, None].float()) for c in part.split(500)]) for part in parts], 1)
    confident = torch.stack([lg.softmax(-1).amax(-1) > 0.9 for lg in logits]).all(0)
    labels = sum(lg.argmax(-1) * 10 ** (len(logits) - 1 - k) for k, lg in enumerate(logits))
    p = torch.bincount(labels, minlength=10 ** len(logits)).double() / len(labels)
    return feats, labels, {"confident": confident.float().mean().item(),
                           "label_entropy_bits": -(p[p > 0] * p[p > 0].log2()).sum().item()}


def sample_quality(net, cfg, ctx, data):
    """--eval-samples N: N samples against N test images, and N other test images against them (the floor), through two
    classifiers of different shapes and seeds (a, b): the Fréchet distance of their features (and its spread: the
    standard deviation over 20 bootstrap resamples of the samples), the confident fraction, the label entropy. With
    labels (--conditional, --sample-class), each class in equal numbers against test images of that class, and the
    accuracy (for two digits both right, and each alone: accuracy_tens, accuracy_units), the Fréchet distance within
    each class and the diversity (the within-class variance of the features over the test images', averaged)."""
    n, g = cfg.eval_samples, torch.Generator(ctx.device).manual_seed(cfg.seed + 1)
    labels = sample_labels(cfg, n, ctx.device)[0]
    reference, other = [], []  # for each class in turn its first m test images, and the next m for the floor
    for c, m in zip(*(labels if labels is not None else torch.zeros(n, dtype=torch.long)).unique_consecutive(
            return_counts=True)):
        idx = torch.arange(len(data["test"])) if labels is None else (data["test_labels"] == c).nonzero()[:, 0].cpu()
        if 2 * m > len(idx):
            raise SystemExit(f"{SCRIPT}: error: --eval-samples {n} needs {2 * m} test images"
                             f"{f' of class {c}' if labels is not None else ''}; the test split has {len(idx)}")
        reference, other = reference + [idx[:m]], other + [idx[m:2 * m]]
    reference, other, start = torch.cat(reference), torch.cat(other), time.time()
    x = draw(net, len(reference), cfg, ctx, g, labels=labels)
    figures = {"samples": {}, "test": {}, "seconds": time.time() - start}
    test = binarise(data["test"][torch.cat([reference, other]).to(ctx.device)], g)
    for kind in "ab":
        clf, resample = train_classifier(cfg, ctx, kind), torch.Generator().manual_seed(cfg.seed)
        (f_s, l_s, s), (f_t, l_t, t) = image_figures(clf, x), image_figures(clf, test[:len(reference)])
        f_o = image_figures(clf, test[len(reference):])[0]
        s["frechet"], t["frechet"] = frechet_distance(f_s, f_t), frechet_distance(f_o, f_t)
        s["frechet_spread"] = torch.tensor([frechet_distance(f_s[torch.randint(len(f_s), (len(f_s),), generator=
                                            resample)], f_t) for _ in range(20)]).std().item()
        classes = [] if labels is None else [c for c in labels.unique().tolist() if (labels == c).sum() > 1]
        spread = lambda f: torch.cov(f.double().T).trace()  # noqa: E731  the total variance of features (M, D)
        for part, found, f in ((s, l_s, f_s), (t, l_t, f_o)) if labels is not None else ():
            part["accuracy"] = (found == labels).float().mean().item()
            if cfg.digits == 2:  # each digit on its own: the tens (left) and the units (right)
                part["accuracy_tens"] = (found // 10 == labels // 10).float().mean().item()
                part["accuracy_units"] = (found % 10 == labels % 10).float().mean().item()
            part["frechet_by_class"] = {str(c): frechet_distance(f[labels == c], f_t[labels == c]) for c in classes}
            part["diversity"] = sum(spread(f[labels == c]) / spread(f_t[labels == c]) for c in classes).item() / max(
                1, len(classes))
        for name, part in (("samples", s), ("test", t)):
            figures[name].update({f"{key}_{kind}": value for key, value in part.items()})
    return figures


SWEPT = ("sampler", "sample_steps", "guidance", "grad_guidance")  # the sampling settings sample_all() sweeps


# ======================================================================================================================
# Run machinery: the same in every script but for the model line in build(); safe to skip on a first reading. It uses
# from the experiment: SCRIPT, UNIT, Config, PRESETS, check, load_data, get_batch, evaluation_set, to_unit,
# from_authors, train_loss, evaluate, sample, complete, sample_quality and SWEPT.
# ======================================================================================================================

PREEMPTED = 75  # the exit code after a stop signal: the checkpoint is written; continue with --resume (EX_TEMPFAIL)
MODES = ("preset", "resume", "eval_only", "sample_only", "init_from", "out_dir", "device", "dtype", "compile")


def flag(name, value=True):
    """A setting as the command line writes it: flag("eval_n", ("inf", "10")) = "--eval-n inf 10"."""
    shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
    return f"--{name.replace('_', '-')}" + ("" if value is True else f" {shown}")


def parse_args(argv=None, saved=None, source="the checkpoint", strict=True):
    """Command line -> Config: by rising priority the default, the --preset's, a checkpoint's (saved), the flag's. A bad
    value, a combination check() refuses (if strict) or a flag that changes the checkpoint's model or data: one line."""
    argv, fields = list(sys.argv[1:] if argv is None else argv), {f.name: f for f in dataclasses.fields(Config)}
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--preset", default="paper")
    defaults = {k: f.default for k, f in fields.items()} | PRESETS.get(first.parse_known_args(argv)[0].preset, {})
    for k, v in (saved or {}).items():  # a checkpoint may hold one value where several are allowed now
        if k in fields and k not in MODES:
            defaults[k] = (tuple(v) if isinstance(v, (tuple, list)) else (v,)) if fields[k].type is tuple else v
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for k, f in fields.items():
        meta, default = f.metadata, defaults[k]
        kind = dict(action="store_true") if f.type is bool else dict(nargs="+", type=type(f.default[0])) \
            if f.type is tuple else dict(type=f.type)
        choices = " {" + ", ".join(map(str, meta["choices"])) + "}" if "choices" in meta else ""
        shown = f" (default: {flag(k, default)[len(k) + 3:]})" if default not in ("", False) else ""
        p.add_argument(flag(k), default=default, help=meta["help"] + choices + shown, **kind)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})
    if differ := [f"{flag(k, saved[k])} in the checkpoint, {getattr(cfg, k)} now" for k, f in fields.items()
                  if f.metadata["fixed"] and k in (saved or {}) and getattr(cfg, k) != saved[k]]:
        raise SystemExit(f"{SCRIPT}: error: {source} was made with other model or data settings: {'; '.join(differ)}. "
                         f"Leave those flags out to use the checkpoint's")
    for k, f in fields.items():
        meta, values = f.metadata, getattr(cfg, k) if f.type is tuple else (getattr(cfg, k),)
        if bad := [v for v in values if "choices" in meta and v not in meta["choices"]]:
            *choices, last = map(str, meta["choices"])
            p.error(f"{flag(k)} takes {', '.join(choices)} or {last}, got {bad[0]}")
        if bad := [v for v in values if "low" in meta and not meta["low"] <= v < meta.get("high", math.inf)]:
            p.error(f"{flag(k)} must be " + (f"in [{meta['low']}, {meta['high']})" if "high" in meta else
                                             f">= {meta['low']}") + f", got {bad[0]}")
    cfg, problems = check(cfg)
    if strict and problems:
        p.error(problems[0])
    return cfg


@dataclasses.dataclass
class Context:
    """Where this process runs: device, autocast, its rank among `world` processes, the run directory."""
    device: torch.device
    autocast: torch.autocast
    rank: int
    world: int
    out_dir: str

    def log(self, line):
        """On rank 0: print with the time, and append to <out-dir>/log.txt (made on first use)."""
        if self.rank == 0:
            print(line := time.strftime("%H:%M:%S ") + line, flush=True)
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")


def keep_freed_memory():
    """On glibc, keep freed memory in the process (blocks up to 32 MB; the heap trimmed only above 1 GB), so that a step
    does not fault its activations back in each time. Returns whether it applied."""
    with contextlib.suppress(OSError):  # mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD (glibc's malloc.h)
        return all(ctypes.CDLL("libc.so.6").mallopt(k, v) for k, v in ((-3, 32 << 20), (-1, 1 << 30), (-2, 256 << 20)))
    return False


def setup(cfg):
    """Process group (under torchrun), device (cuda: this process's GPU; one not here stops with one line saying which
    are), autocast dtype, allocator -> Context."""
    keep_freed_memory()
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = ["cpu", *[f"cuda:{k}" for k in range(gpus)], *(["mps"] if torch.backends.mps.is_available() else [])]
    name = {"auto": "cuda" if gpus else here[-1]}.get(cfg.device, cfg.device)
    name = f"cuda:{local % max(1, gpus)}" if name == "cuda" else name
    if name not in here:
        raise SystemExit(f"{SCRIPT}: error: --device {cfg.device} is not available here; available: {', '.join(here)}")
    if world > 1:  # the others wait while rank 0 evaluates: a long timeout
        dist.init_process_group("nccl" if name.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=1))
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = cfg.dtype if cfg.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32"
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    return Context(device, autocast, dist.get_rank() if world > 1 else 0, world, cfg.out_dir)


def build(cfg, device):
    """The network, its EMA copy (evaluation and sampling) and AdamW, with weight decay on weights only."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = UNet(cfg.channels, (1, 2, 2), cfg.res_blocks, cfg.dropout, 10 ** cfg.digits if cfg.conditional else 0,
                 cfg.norm_groups).to(device)
    decay = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # not biases, norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": [p for p in model.parameters() if all(p is not q for q in decay)], "weight_decay": 0.0}]
    return model, copy.deepcopy(model).eval().requires_grad_(False), torch.optim.AdamW(groups, cfg.lr, cfg.betas)


class Progress:
    """For long evaluations and sampling runs: 'label: done / total | seconds | ETA' at most every 30 seconds."""

    def __init__(self, label, total):
        self.label, self.total, self.done, self.start = label, total, 0, time.time()
        self.last = self.start

    def tick(self):
        self.done, now = self.done + 1, time.time()
        if now - self.last >= 30:
            eta, self.last = (now - self.start) / self.done * (self.total - self.done) / 60, now
            print(f"{self.label}: {self.done} / {self.total} | {now - self.start:.0f} s | ETA {eta:.1f} min",
                  flush=True)


def summarise(losses, recon, cfg):
    """Per-example losses in nats, pass after pass -> {n: {loss, recon, total, stderr}} in the paper's unit; each
    example's passes are averaged first, so the standard error is over examples."""
    per_example = lambda parts: to_unit(torch.cat(parts).double().view(cfg.eval_repeats, -1).mean(0), cfg)  # noqa: E731
    recon, result = per_example(recon), {}
    for n, parts in losses.items():
        total = per_example(parts) + recon
        result[n] = {"loss": (total - recon).mean().item(), "recon": recon.mean().item(), "total": total.mean().item(),
                     "stderr": total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")}
    return result


def fingerprint(data):
    """The identity of a dataset: each split's shape and a CRC-32 of all its bytes ('test 10000x28x28, ...')."""
    crc = 0
    for split in sorted(data):
        crc = zlib.crc32(data[split].cpu().contiguous().numpy().tobytes(), crc)
    return ", ".join(f"{s} {'x'.join(map(str, data[s].shape))}" for s in sorted(data)) + f", crc32 {crc:08x}"


def read_checkpoint(cfg, ctx):
    """The checkpoint to start from: --init-from's, or for --resume, --eval-only and --sample-only <out-dir>/ckpt.pt
    (ckpt-prev.pt if that is unreadable, saying so); None for a fresh run. Loading never runs code (weights_only)."""
    resuming = cfg.resume or cfg.eval_only or cfg.sample_only
    paths = [cfg.init_from] if cfg.init_from else [os.path.join(cfg.out_dir, n) for n in ("ckpt.pt", "ckpt-prev.pt")]
    for path in paths if cfg.init_from or resuming else []:
        try:
            ckpt = torch.load(path, map_location=ctx.device, weights_only=True)
            if not isinstance(ckpt, dict) or not ({"model", "ema", "config"} <= set(ckpt) or any(
                    str(k).startswith("net.") for k in ckpt)):  # ours, or the authors' (net.* tensors)
                raise ValueError(f"neither a checkpoint of {SCRIPT} nor one of the authors' release")
        except FileNotFoundError:
            continue
        except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
            message = f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            if cfg.init_from:
                raise SystemExit(f"{SCRIPT}: error: --init-from {message}")
            ctx.log(f"warning: {message}")
            continue
        if ckpt.get("script", SCRIPT) != SCRIPT:
            raise SystemExit(f"{SCRIPT}: error: {path} is a checkpoint of {ckpt['script']}; use that script")
        if path.endswith("ckpt-prev.pt"):
            ctx.log(f"using the previous checkpoint {path}")
        return ckpt
    if cfg.init_from or resuming:
        raise SystemExit(f"{SCRIPT}: error: --init-from {cfg.init_from}: no such file" if cfg.init_from else f"{SCRIPT}"
                         f": error: no checkpoint in {cfg.out_dir} (ckpt.pt or ckpt-prev.pt) to resume, evaluate or "
                         f"sample from")


def restore(cfg, ctx, ckpt, model, ema, optimizer, data_id):
    """Load a checkpoint's weights (for --resume also its optimiser and step) once its tensors and (for --resume) its
    data are checked against this run's; log what changed since. Returns the first step."""
    if ckpt is None:
        return 0
    source = cfg.init_from or os.path.join(cfg.out_dir, "ckpt.pt")
    fixed = [f.name for f in dataclasses.fields(Config) if f.metadata["fixed"]]
    state, saved = (ckpt["model"], parse_args([], ckpt["config"])) if "config" in ckpt else (from_authors(ckpt), cfg)
    for name in sorted(set(model.state_dict()) | set(state)):  # the first tensor that does not fit, if any
        have, want = [tuple(s[name].shape) if name in s else None for s in (state, model.state_dict())]
        if have != want:
            raise SystemExit(f"{SCRIPT}: error: {source} does not fit this network: tensor {name} is "
                             f"{have or 'missing'} there, {want or 'not in this network'} here. Give the network flags "
                             f"({', '.join(map(flag, fixed))}) of the run that wrote it")
    if ckpt.get("data", data_id) != data_id:
        message = f"the checkpoint was trained on other data ({ckpt['data']}; now {data_id})"
        if cfg.resume:
            raise SystemExit(f"{SCRIPT}: error: {message}. Resume on the same data, or use another --out-dir")
        ctx.log(f"note: {message}")
    model.load_state_dict(state)
    ema.load_state_dict(ckpt.get("ema", state))
    if cfg.init_from:
        origin = f"step {ckpt['step']}" if "config" in ckpt else "the authors' layout"
        ctx.log(f"weights from {source} ({origin}); the optimiser and the step count start afresh")
        return 0
    changed = [f"{flag(k, getattr(saved, k))} -> {flag(k, getattr(cfg, k))[len(k) + 3:]}" for k in ckpt["config"]
               if k in Config.__annotations__ and k not in MODES and getattr(saved, k) != getattr(cfg, k)]
    ctx.log("changed since the checkpoint: " + (", ".join(changed) or "nothing"))
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["step"]


def save_checkpoint(cfg, ctx, model, ema, optimizer, step, data_id):
    """ckpt.pt through a temporary file, the previous one kept as ckpt-prev.pt: a crash or a full disk mid-write never
    leaves the run without a readable checkpoint."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "config": dataclasses.asdict(cfg), "data": data_id, "script": SCRIPT}, path + ".tmp")
        if os.path.exists(path):
            os.replace(path, os.path.join(cfg.out_dir, "ckpt-prev.pt"))
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as either
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise SystemExit(f"{SCRIPT}: error: writing the checkpoint {path} failed ({e}); stopping. The last good "
                         f"checkpoint is still in {cfg.out_dir}")
    ctx.log(f"checkpoint at step {step}: {path}")


def available_memory(device):
    """Bytes this process can still allocate: free GPU memory, or on Linux the available memory (within a container's
    limit); None where that is unknown."""
    if device.type != "cpu":
        return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else \
            torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    with contextlib.suppress(OSError, StopIteration, ValueError):
        free = int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1]) * 1024
        with contextlib.suppress(OSError, ValueError):
            limit, used = (open(f"/sys/fs/cgroup/memory.{k}").read().strip() for k in ("max", "current"))
            free = free if limit == "max" else min(free, int(limit) - int(used))
        return free


def step_cost(cfg, ctx, model, data, free=None):
    """A pass on 2 examples counting the tensors autograd keeps, then passes on n and 2n examples, timed (n = 4, or 1
    where 8 would not fit in `free` bytes) -> (n, seconds per pass, seconds per example, bytes per example with half
    again for the backward pass's temporaries, bytes of the gradients and AdamW's moments)."""
    kept, weights = {}, {p.untyped_storage().data_ptr() for p in model.parameters()}
    pack = lambda t: kept.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t  # noqa: E731

    def seconds(n, hooks=contextlib.nullcontext()):
        probe, start = dataclasses.replace(cfg, batch_size=n), time.time()
        with hooks:
            train_loss(model, get_batch(data, probe), probe, ctx).mean().backward()
        model.zero_grad(set_to_none=True)
        return time.time() - start

    seconds(2, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
    example = 0.75 * sum(v for k, v in kept.items() if k not in weights)
    state = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    n = 4 if free is None or state + 8 * example <= 0.9 * free else 1
    one, two = seconds(n), seconds(2 * n)
    return n, max(2 * one - two, 0.0), max(two - one, 1e-9) / n, example, state


def plan_steps(cfg, ctx, model, data):
    """Before the first step, what a step costs (step_cost) against the memory available: a batch that does not fit is
    split into micro-batches that do (the same global batch); one example that cannot stops. Logs the plan (on a CPU
    or MPS without --preset quick, pointing to it). Returns micro-batches per batch."""
    free = available_memory(ctx.device)
    n, per_pass, per_example, example, state = step_cost(cfg, ctx, model, data, free)
    gib, pieces, fits = lambda b: f"{b / 2 ** 30:.2g} GiB", 1, lambda k: state + example * k <= 0.9 * free  # noqa: E731
    if free is not None and not fits(cfg.batch_size):
        if not fits(1):
            sizes = ", ".join(flag(f.name) for f in dataclasses.fields(Config) if f.metadata["fixed"] and f.type is int)
            raise SystemExit(f"{SCRIPT}: error: one example needs ≈{gib(state + example)} on {ctx.device} and "
                             f"{gib(free)} is available: lower {sizes}")
        pieces = min(k for k in range(1, cfg.batch_size + 1) if cfg.batch_size % k == 0 and fits(cfg.batch_size / k))
        ctx.log(f"memory: a batch of {cfg.batch_size} needs ≈{gib(state + example * cfg.batch_size)} and "
                f"{gib(free)} is available: each is split into {pieces} micro-batches (the same global batch)")
    step = cfg.grad_accum * (pieces * per_pass + cfg.batch_size * per_example)
    total = cfg.steps * step
    total = f"{total / 3600:.1f} h" if total >= 3600 else f"{total / 60:.0f} min" if total >= 60 else f"{total:.0f} s"
    hint = "; --preset quick trains a small model in minutes" if ctx.device.type != "cuda" and cfg.preset != "quick" \
        else ""
    ctx.log(f"plan: ≈{step:.2g} s per step (timed on {n} and {2 * n} examples), ≈{total} for {cfg.steps} steps, ≈"
            f"{gib(state + example * cfg.batch_size / pieces)} of {gib(free) if free else 'unknown'} memory{hint}")
    return pieces


def learning_rate(step, cfg):
    """The learning rate of optimiser step `step` (from 0): linear warm-up over --lr-warmup steps, then constant (the
    paper's) or a cosine or linear decay to --lr-final x --lr at --steps."""
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    progress = min(1.0, (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup))
    shape = {"none": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[cfg.lr_decay]
    return cfg.lr * (cfg.lr_final + (1 - cfg.lr_final) * shape) if cfg.lr_decay != "none" else cfg.lr


@contextlib.contextmanager
def stop_signals(done):
    """Within: a first SIGTERM, SIGINT or SIGUSR1 says at once that the run stops after this step (the loop then saves
    and exits with PREEMPTED), a second ends the process; answered by a thread that Python's handler wakes through a
    pipe, also while the main thread is inside one long operation. done[0]: steps done. Yields the signals received."""
    received, stops = [], (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield received
        return
    read, write = os.pipe()
    os.set_blocking(write, False)

    def answer():
        while (number := os.read(read, 1)[0]) != 0:  # 0: the context is closing
            if number in stops and received:
                os._exit(128 + number)
            if number in stops:
                received.append(signal.Signals(number).name)
                os.write(1, f"{received[0]}: stopping after step {done[0] + 1}; a second signal stops at once\n"
                         .encode())

    previous = {s: signal.signal(s, lambda signum, frame: None) for s in stops}
    wakeup, thread = signal.set_wakeup_fd(write), threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        signal.set_wakeup_fd(wakeup)
        for s, h in previous.items():
            signal.signal(s, h)
        os.write(write, b"\0")
        thread.join()
        os.close(read), os.close(write)


class Meter:
    """The training log line: the loss in the paper's unit (the mean over processes), examples/s and ms/step since the
    last line (evaluation and sampling left out), peak memory, ETA; the first line after 10 steps or 5 seconds."""

    def __init__(self, cfg, ctx, step):
        self.cfg, self.ctx, self.first, self.last, self.loss = cfg, ctx, step, step, torch.zeros((), device=ctx.device)
        self.start = self.clock = time.time()

    def due(self, step):
        early = self.last == self.first and (step - self.first >= 10 or time.time() - self.start > 5)
        return step % self.cfg.log_every == 0 or step == self.cfg.steps or early

    def log(self, step, grad_norm, lr):
        if self.ctx.world > 1:
            dist.all_reduce(self.loss)
        seconds, steps, cfg, world = time.time() - self.clock, step - self.last, self.cfg, self.ctx.world
        peak = torch.cuda.max_memory_allocated(self.ctx.device) if self.ctx.device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        loss = to_unit(self.loss.item() / steps / world, cfg)
        speed = steps * cfg.batch_size * cfg.grad_accum * world / seconds  # examples/s
        self.ctx.log(f"step {step} | loss {loss:.4g} {UNIT} | grad norm {grad_norm:.3g} | lr {lr:.3g} | "
                     f"{speed:.1f} examples/s | {1000 * seconds / steps:.0f} ms/step | peak mem "
                     f"{peak / 2 ** 20:.0f} MB | ETA {(cfg.steps - step) * seconds / steps / 60:.1f} min")
        self.loss.zero_()
        self.clock, self.last = time.time(), step


def train(cfg, ctx, data, model, ema, optimizer, step, pieces, data_id):
    """The training loop from `step` to --steps: batch, L^inf, backward, clip, AdamW, EMA; then the log line, the
    checkpoint, evaluation and samples at their intervals. pieces: micro-batches per batch (plan_steps)."""
    net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.world > 1 else model
    net, meter, done = torch.compile(net) if cfg.compile else net, Meter(cfg, ctx, step), [step]
    with stop_signals(done) as received:
        while step < cfg.steps:
            torch.manual_seed(hash((cfg.seed, ctx.rank, step)) % 2 ** 62)  # batch, t, noise: from seed, rank, step
            model.train()
            parts = [part for _ in range(cfg.grad_accum) for part in zip(
                *[[None] * pieces if x is None else x.chunk(pieces) for x in get_batch(data, cfg)])]
            for k, part in enumerate(parts):
                with net.no_sync() if ctx.world > 1 and k < len(parts) - 1 else contextlib.nullcontext():
                    loss = train_loss(net, part, cfg, ctx).mean() / len(parts)
                    loss.backward()
                meter.loss += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # EMA with warm-up: the effective decay grows towards --ema-decay
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - min(cfg.ema_decay, (2 + step) / (11 + step)))
            step = done[0] = step + 1
            # one host sync per step, agreed by all processes: a non-finite loss, a stop signal, a log line due
            flags = torch.cat([(~torch.isfinite(meter.loss + grad_norm)).float()[None],
                               torch.tensor([float(bool(received)), float(meter.due(step))], device=ctx.device)])
            if ctx.world > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad, stop, due = flags.tolist()
            if bad:
                raise SystemExit(f"{SCRIPT}: error: non-finite loss at step {step} (grad norm {grad_norm.item()}); "
                                 f"the last checkpoint is untouched")
            if due:
                meter.log(step, grad_norm.item(), group["lr"])
            if ctx.rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps or stop):
                save_checkpoint(cfg, ctx, model, ema, optimizer, step, data_id)
            if stop:
                ctx.log(f"preempted by {received[0] if received else 'a signal to another process'} after step "
                        f"{step}: the checkpoint is written; continue with the same command and --resume")
                raise SystemExit(PREEMPTED)
            if ctx.rank == 0 and step < cfg.steps:  # evaluation and sampling are left out of examples/s
                start = time.time()
                if cfg.eval_every and step % cfg.eval_every == 0:
                    run_eval(ema, data, "val", step, cfg, ctx)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    sample_all(ema, data, cfg, ctx, quality=False)
                meter.clock += time.time() - start
    return step


def run_eval(ema, data, split, step, cfg, ctx):
    """Evaluate the EMA network on a split, log the bound for each n and write eval.json."""
    examples = evaluation_set(data[split], cfg)
    result = evaluate(ema, examples, cfg, ctx, seed=hash((cfg.seed, -1, step)) % 2 ** 62)
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"step": step, "split": split, "unit": UNIT, "examples": len(examples), "repeats": cfg.eval_repeats,
                   "n": result}, f, indent=1)
    ctx.log(f"eval {split} step {step} | " + " | ".join(f"L^{n}+L^r {r['total']:.3f} ± {r['stderr']:.3f} (L^r "
                                                          f"{r['recon']:.3f})" for n, r in result.items()) +
            f" {UNIT} | eval.json")


def sample_all(ema, data, cfg, ctx, quality):
    """Every combination of --sampler, --sample-steps and the experiment's other swept settings: the figures of
    sample(), the conditional samples of complete() and, with quality (--eval-samples), the sample-quality figures,
    logged and tabled (a row per combination, with its network calls and seconds) in samples.json and eval.json.
    Files of a combination are tagged -SAMPLER-STEPS (and -gW for --guidance W, ...) when there are several."""
    table, settings = [], {k: getattr(cfg, k) for k in SWEPT}
    runs = [dict(zip(settings, values)) for values in itertools.product(*settings.values())]
    for run in runs:
        one, extra = dataclasses.replace(cfg, **run), {k: v for k, v in run.items() if k not in SWEPT[:2]}
        tag = "" if len(runs) == 1 else f"-{one.sampler}-{one.sample_steps}" + "".join(
            f"-{k[0]}{v:g}" for k, v in extra.items() if len(settings[k]) > 1)
        sample(ema, one, ctx, tag)
        complete(ema, one, ctx, data, tag)
        if quality:
            figures = sample_quality(ema, one, ctx, data)
            table.append(dict(sampler=one.sampler, steps=one.sample_steps, **extra, network_calls=one.sample_steps + 1,
                              examples=cfg.eval_samples, seconds=round(figures.pop("seconds"), 1), **figures))
            show = lambda d: ", ".join(f"{k} {v:.4g}" for k, v in d.items() if isinstance(v, float))  # noqa: E731
            named = "".join(f", {k} {v:g}" for k, v in extra.items() if v or len(settings[k]) > 1)
            ctx.log(f"sample quality ({one.sampler}, {one.sample_steps} steps{named}, {cfg.eval_samples} samples, "
                    f"{table[-1]['seconds']} s) | samples: {show(figures['samples'])} | test data: "
                    f"{show(figures['test'])}")
    if quality:
        path = os.path.join(cfg.out_dir, "eval.json")
        result = json.load(open(path)) if os.path.exists(path) else {}
        for name, content in (("samples.json", table), ("eval.json", result | {"samples": table})):
            with open(os.path.join(cfg.out_dir, name), "w") as f:
                json.dump(content, f, indent=1)
        ctx.log("sample quality: samples.json, eval.json")


def log_start(cfg, ctx, argv, model, step, data_id):
    """The run's header in log.txt (the date, the command as typed, the commit, the device), its settings beyond the
    paper's defaults, its size and data."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], text=True, capture_output=True,  # noqa: E731
                                    timeout=10).stdout.strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if sha := git("rev-parse", "--short", "HEAD"):
            commit = f" | commit {sha}" + (" (modified)" if git("status", "--porcelain", "-uno") else "")
    command = shlex.join(["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    ctx.log(f"==== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} | {command}{commit} | device {ctx.device} x {ctx.world}")
    ctx.log("settings beyond the paper's defaults: " + (" ".join(flag(k, v) for k, v in dataclasses.asdict(
        cfg).items() if v != getattr(Config, k) and k not in MODES) or "none"))
    ctx.log(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | data {data_id} | step {step}")


@contextlib.contextmanager
def failures(cfg, ctx):
    """Within: CUDA out of memory is one line naming the flags to lower; under torchrun the process that fails says
    why in the run's log before it ends (torchrun then ends the others); the process group is closed."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        ctx.log(cause := f"{SCRIPT}: error: out of memory on {ctx.device} ({str(e).splitlines()[0]}). Lower "
                         f"--batch-size {cfg.batch_size} (raise --grad-accum {cfg.grad_accum} to keep the global "
                         f"batch) or --eval-batch-size {cfg.eval_batch_size}")
        raise SystemExit(cause)
    except BaseException as e:
        if ctx.world > 1 and not (isinstance(e, SystemExit) and e.code in (0, None, PREEMPTED)):
            print(line := f"process {ctx.rank} of {ctx.world} stopped: {type(e).__name__}: {e}", file=sys.stderr)
            os.makedirs(cfg.out_dir, exist_ok=True)  # rank 0 may not have written its first line yet
            with open(os.path.join(cfg.out_dir, "log.txt"), "a") as f:
                f.write(line + "\n")
        raise
    finally:
        if ctx.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    """Parse the flags, then train (or only evaluate, or only sample) in the run directory."""
    cfg = parse_args(argv, strict=False)  # enough to find the checkpoint, if any, and the device
    ctx = setup(cfg)
    with failures(cfg, ctx):
        ckpt, fields = read_checkpoint(cfg, ctx), Config.__dataclass_fields__
        saved = {k: v for k, v in ckpt["config"].items() if k in fields and (not cfg.init_from or fields[k].metadata[
            "fixed"])} if ckpt is not None and "config" in ckpt else None  # the settings the command line leaves open
        cfg = parse_args(argv, saved, cfg.init_from or f"the checkpoint in {cfg.out_dir}")
        data = load_data(cfg, ctx.device)
        data_id = fingerprint(data)
        model, ema, optimizer = build(cfg, ctx.device)
        step = restore(cfg, ctx, ckpt, model, ema, optimizer, data_id)
        log_start(cfg, ctx, argv, model, step, data_id)
        if not (cfg.eval_only or cfg.sample_only):
            step = train(cfg, ctx, data, model, ema, optimizer, step, plan_steps(cfg, ctx, model, data), data_id)
        if ctx.rank == 0 and not cfg.sample_only:
            run_eval(ema, data, "test", step, cfg, ctx)
        if ctx.rank == 0 and (not cfg.eval_only or cfg.eval_samples):
            sample_all(ema, data, cfg, ctx, quality=cfg.eval_samples > 0)
        ctx.log(f"done: {cfg.out_dir}")
        if ctx.world > 1:
            dist.barrier()  # the other processes wait for rank 0's evaluation and samples


if __name__ == "__main__":
    main()
