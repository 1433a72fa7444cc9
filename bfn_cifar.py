"""Bayesian Flow Network on CIFAR-10 (§4 and §5 of Graves et al., arXiv:2308.07037): continuous or discretised data.

Trains the authors' VDM-style U-Net with the continuous-time loss L^inf (Algorithms 2 and 5), evaluates the test bound
L^inf + L^r and L^n + L^r in bits/dim (the paper: 2.66 with 256 bins), and samples with Algorithms 3 and 6 or the ODE or
SDE solver of common.py. --output continuous: p_O is a delta at the predicted x_hat (§4); discretised: a clipped
discretised Gaussian (§5). --bins: 8-bit pixels, or 16 levels. Writes log.txt, ckpt.pt, eval.json, samples.png and .pt,
and evolution.png/.gif (mu and the prediction over time) to --out-dir.

    python bfn_cifar.py --preset quick                       # a small U-Net, 16 bins, minutes on a CPU
    python bfn_cifar.py                                      # the paper's model: discretised, 256 bins
    python bfn_cifar.py --output continuous --bins 16        # sigma_1 = sqrt(0.001), as the paper's 16-bin runs
    torchrun --nproc_per_node=8 bfn_cifar.py --batch-size 4  # the paper's global batch of 32 on 8 GPUs
    python bfn_cifar.py --sample-only --sampler sde --sample-steps 25 --num-samples 500   # then, to score them:
    python benchmarks/score_samples.py runs/bfn_cifar/samples-sde-25.pt
    python bfn_cifar.py --sample-only --inpaint centre --particles 8   # complete the middle of test images
    python bfn_cifar.py --sample-only --grad-guidance 2 --sample-class 3   # steer any model towards a class

Shapes: B batch, C = 3 colour channels, H = W = 32, K bins.
"""
import argparse, contextlib, copy, ctypes, dataclasses, datetime, json, math, os, pickle, shlex, shutil, signal, sys
import time, types, zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import bin_centres, bin_index, continuous_flow, continuous_guided_x_hat, continuous_loss_inf, \
    continuous_loss_n, continuous_recon_loss, continuous_sample, continuous_sample_ode, continuous_sample_sde, \
    continuous_sample_smc, continuous_x_hat, discretised_log_probs, discretised_loss_inf, discretised_loss_n, \
    discretised_output, discretised_probs, discretised_recon_loss, discretised_sample, discretised_sample_ode, \
    discretised_sample_sde, discretised_sample_smc, recorded, replace_known_probs, replace_known_x_hat, \
    stratified_steps, stratified_times

SCRIPT, UNIT, D, BETAS = "bfn_cifar.py", "bits/dim", 3 * 32 * 32, (0.9, 0.99)  # D: the dimensions of an image


def opt(default, help=None, fixed=False, **kwargs):
    """A setting: its default; its --help (None: not a flag, the presets set it); whether it fixes the model or the
    data (a checkpoint keeps it); argparse's choices."""
    return dataclasses.field(default=default, metadata=dict(help=help, fixed=fixed, **kwargs))


@dataclasses.dataclass
class Config:
    """Every setting of a run; each with help is a flag (--batch-size for batch_size). The defaults are the paper's."""
    data_dir: str = opt("data", "where CIFAR-10 is, or is downloaded to (torchvision's: DIR/cifar-10-batches-py)")
    bins: int = opt(256, "K: 256 (8-bit pixels) or 16 (pixels quantised to 4 bits)", True, choices=(256, 16))
    output: str = opt("discretised", "the output distribution (§4 or §5)", True,
                      choices=("continuous", "discretised"))
    conditional: bool = opt(False, "the network also sees the class label", True)
    sigma_1: float = opt(0.0, "final input std sigma_1 (§4.5); 0: 0.001 for 256 bins, sqrt(0.001) for 16", True)
    channels: int = opt(128, "U-Net channels (a multiple of 8)", True)
    res_blocks: int = opt(32, "residual blocks (all at full resolution)", True)
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)")
    batch_size: int = opt(32, "examples per process and step (global: x --grad-accum x processes); also of "
                              "evaluation and sampling")
    grad_accum: int = opt(1, "batches accumulated per optimiser step")
    lr: float = opt(2e-4, "AdamW learning rate")
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = opt(0, "evaluate on the first N test images (0: all)")
    eval_repeats: int = opt(1, "passes over them with fresh noise")
    sampler: str = opt("paper", "Algorithms 3 and 6, or the second-order ODE or SDE solver",
                       choices=("paper", "ode", "sde"))
    sample_steps: int = opt(1000, "generation steps n")
    num_samples: int = opt(64, "images to sample (samples.png, samples.pt), or test images to complete")
    sample_class: tuple = opt(("all",), "with --conditional or --grad-guidance: the classes to sample, a row each")
    guidance: float = opt(0.0, "classifier-free guidance weight of a --conditional model")
    grad_guidance: float = opt(0.0, "gradient guidance weight towards --sample-class, through a classifier of mu")
    inpaint: str = opt("", "complete test images: top, bottom, left, right, centre, or a mask image (white: generate)")
    particles: int = opt(1, "with --inpaint: sequential Monte Carlo over P particles (1: replacement)")
    preset: str = opt("paper", "the paper's settings, or a small CPU recipe; flags given win",
                      choices=("paper", "quick"))
    out_dir: str = opt("runs/bfn_cifar", "the run directory")
    resume: bool = opt(False, "continue from <out-dir>/ckpt.pt with its settings (flags given change them)")
    init_from: str = opt("", "start from the weights of another run's ckpt.pt or an authors' checkpoint")
    eval_only: bool = opt(False, "evaluate the checkpoint in <out-dir> on the test set")
    sample_only: bool = opt(False, "sample from the checkpoint in <out-dir>")
    seed: int = opt(0, "everything random derives from it")
    device: str = opt("auto", "auto (cuda, mps or cpu), cpu, cuda (this process's GPU), cuda:N or mps")
    compile: bool = opt(False, "torch.compile the network for training")
    t_draw: str = opt("uniform", "the times t of a training batch: uniform, each drawn alone (the paper), or "
                                 "stratified, one in each 1/B of [0, 1] (the same loss, less variance)",
                      choices=("uniform", "stratified"))
    log_every: int = opt(100, "steps between log lines")
    dropout: float = opt(0.1)  # in the residual blocks
    lr_warmup: int = opt(0)  # steps of linear learning-rate warm-up (the paper: none)
    lr_decay: str = opt("none")  # cosine: down to 0.1 --lr at --steps (the paper: constant)


PRESETS = {"paper": {}, "quick": dict(bins=16, channels=32, res_blocks=2, dropout=0.0, batch_size=16, lr=1e-3,
                                      steps=2400, eval_examples=500, sample_steps=100)}
INPAINT_REGIONS = ("top", "bottom", "left", "right", "centre")
GROUPS = 32  # GroupNorm groups at most (the authors')


def check(cfg):
    """The settings that depend on each other -> (cfg, with sigma_1 for the bins and every class for --grad-guidance
    without --sample-class; the first problem, a one-line message, or None)."""
    if cfg.sigma_1 == 0:  # the paper's: sigma_1 = 0.001 for 256 bins, sqrt(0.001) for 16
        cfg = dataclasses.replace(cfg, sigma_1=0.001 if cfg.bins == 256 else math.sqrt(0.001))
    if cfg.grad_guidance and cfg.sample_class == ("all",) and not cfg.conditional:
        cfg = dataclasses.replace(cfg, sample_class=tuple(map(str, range(10))))
    return cfg, next((message for bad, message in [
        *[(getattr(cfg, k) < 1, f"--{k.replace('_', '-')} must be at least 1, got {getattr(cfg, k)}") for k in (
            "batch_size", "grad_accum", "eval_repeats", "sample_steps", "num_samples", "particles", "log_every")],
        (not 0 < cfg.sigma_1 < 1 or cfg.lr <= 0 or cfg.guidance < -1 or cfg.grad_guidance < 0, "--sigma-1 must be in "
         "(0, 1), --lr positive, --guidance at least -1, --grad-guidance at least 0"),
        (cfg.channels < 8 or cfg.channels % 8 or cfg.res_blocks < 1, "--channels must be a multiple of 8 and "
         f"--res-blocks at least 1, got {cfg.channels} and {cfg.res_blocks}"),
        (any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n),
         f"--eval-n takes inf or positive integers, got {' '.join(cfg.eval_n)}"),
        (cfg.conditional and GROUPS % cfg.channels == 0, f"--conditional needs more channels than the {GROUPS} "
         "GroupNorm groups, or the normalisation erases the label: raise --channels"),
        (cfg.guidance and not cfg.conditional, "--guidance needs a --conditional model"),
        (cfg.sample_class != ("all",) and not (cfg.conditional or cfg.grad_guidance),
         "--sample-class needs a --conditional model or --grad-guidance"),
        (any(c != "all" and not (c.isdigit() and int(c) < 10) for c in cfg.sample_class),
         f"--sample-class takes all or classes 0..9, got {' '.join(cfg.sample_class)}"),
        (cfg.inpaint not in ("", *INPAINT_REGIONS) and not os.path.isfile(cfg.inpaint),
         f"--inpaint takes {', '.join(INPAINT_REGIONS)} or a mask image, and {cfg.inpaint} is neither (no such file)"),
        (cfg.particles > 1 and not cfg.inpaint, "--particles is for --inpaint"),
        (cfg.particles > 1 and cfg.sampler == "ode", "--particles needs a stochastic sampler (paper, sde): the ODE "
         "solver is deterministic after its first draw, so there is nothing to reweight"),
        (cfg.eval_only and cfg.sample_only, "--eval-only and --sample-only exclude each other"),
        (cfg.resume and bool(cfg.init_from), "--resume and --init-from exclude each other")] if bad), None)


# ----------------------------------------------------------------------------------------------------------------------
# Data: CIFAR-10 as uint8 tensors on the device; a batch is quantised to the centres of --bins bins.

CIFAR_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}


def read_cifar_batch(path):
    """One python-pickled CIFAR-10 batch -> ((N, 3, 32, 32) uint8 images, (N,) labels)."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data, labels = torch.as_tensor(batch["data"]), torch.as_tensor(batch["labels"])
    except Exception as e:  # a truncated or foreign file fails in many ways inside pickle
        raise SystemExit(f"{SCRIPT}: error: {path} is corrupt or not a CIFAR-10 batch ({type(e).__name__}: {e}). "
                         f"Delete the folder to download it afresh")
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise SystemExit(f"{SCRIPT}: error: {path} holds {tuple(data.shape)} {data.dtype} data, expected (N, 3072) "
                         f"uint8. Delete the folder to download it afresh")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(data_dir):
    """{train, test}: ((N, 3, 32, 32) uint8 images, (N,) labels). Missing files are downloaded by torchvision
    (MD5-checked) into data_dir; a --data-dir that does not exist is refused, and a failed download leaves no folder."""
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    if not all(os.path.exists(os.path.join(folder, f)) for files in CIFAR_FILES.values() for f in files):
        if data_dir != Config.data_dir and not os.path.isdir(data_dir):
            raise SystemExit(f"{SCRIPT}: error: --data-dir {data_dir} does not exist")
        made = data_dir if not os.path.exists(data_dir) else None
        try:
            import torchvision
            torchvision.datasets.CIFAR10(data_dir, train=True, download=True)
        except Exception as e:
            if made:
                shutil.rmtree(made, ignore_errors=True)
            raise SystemExit(f"{SCRIPT}: error: downloading CIFAR-10 (163 MB) into {data_dir} failed ({e}); put the "
                             f"extracted cifar-10-batches-py folder there by hand")
    return {split: [torch.cat(parts) for parts in zip(*[read_cifar_batch(os.path.join(folder, f)) for f in files])]
            for split, files in CIFAR_FILES.items()}


def load_data(cfg, device):
    """{train, val, test}: (N, 3, 32, 32) uint8 pixels, and {train, val, test}_labels: (N,) classes 0..9, on the device;
    train/val is a fixed 99% / 1% split of the training set."""
    cifar = load_cifar(cfg.data_dir)
    perm = torch.randperm(len(cifar["train"][0]), generator=torch.Generator().manual_seed(0))
    n_val, data = len(perm) // 100, {}  # 500 of 50,000
    for split, (images, labels), idx in [("train", cifar["train"], perm[n_val:]), ("val", cifar["train"], perm[:n_val]),
                                         ("test", cifar["test"], slice(None))]:
        data[split], data[split + "_labels"] = images[idx].to(device), labels[idx].to(device)
    return data


def quantise(pixels, K):
    """8-bit pixels v -> the centre of bin floor(v K / 256) on [-1, 1] (§5.1). (B, 3, 32, 32) uint8 -> float32."""
    return bin_centres(K, device=pixels.device)[pixels.long() * K // 256]


def get_batch(data, cfg):
    """A random training batch: (B, 3, 32, 32) bin centres and, with --conditional, the (B,) labels (else None)."""
    idx = torch.randint(len(data["train"]), (cfg.batch_size,), device=data["train"].device)
    return quantise(data["train"][idx], cfg.bins), data["train_labels"][idx].long() if cfg.conditional else None


def evaluation_set(images, cfg):
    """The first --eval-examples images of a split (all if 0). (N, 3, 32, 32) uint8."""
    return images[:cfg.eval_examples or None]


def to_unit(nats, cfg):
    """Nats per example -> the paper's unit, bits/dim: nats / (D ln 2)."""
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
    """VDM's sinusoidal features [sin, cos] of 1000 (t + 0.001), frequencies 10^(-4 k / (dim / 2 - 1)).
    (B,) -> (B, dim)."""
    freqs = torch.logspace(0, -4, dim // 2, device=t.device)
    args = 1000 * (t.float() + 0.001)[:, None] * freqs  # (B, dim / 2)
    return torch.cat([args.sin(), args.cos()], -1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; plus a projection of the time embedding (no bias, starts at zero); GroupNorm, SiLU,
    dropout, conv; plus the (projected) input."""

    def __init__(self, c_in, c_out, c_emb, dropout, groups):
        super().__init__()
        self.net1 = nn.Sequential(group_norm(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.cond_proj = zero(nn.Linear(c_emb, c_out, bias=False))
        self.net2 = nn.Sequential(group_norm(c_out, groups), nn.SiLU(), nn.Dropout(dropout),
                                  zero(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip_conv = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # (B, c_in, H, W), (B, c_emb) -> (B, c_out, H, W)
        h = self.net1(x) + self.cond_proj(emb)[:, :, None, None]  # (B, c_out, H, W)
        return self.skip_conv(x) + self.net2(h)


class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions, with a residual connection."""

    def __init__(self, c, groups, heads=1):
        super().__init__()
        self.heads, self.norm = heads, group_norm(c, groups)
        self.qkv, self.proj_out = nn.Conv2d(c, 3 * c, 1), zero(nn.Conv2d(c, c, 1))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        qkv = rearrange(self.qkv(self.norm(x)), "b (three h d) y x -> three b h (y x) d", three=3, h=self.heads)
        h = F.scaled_dot_product_attention(*qkv.contiguous())  # (B, heads, H W, C / heads); contiguous: fast on CPU
        return x + self.proj_out(rearrange(h, "b h (y x) d -> b (h d) y x", y=x.shape[2]))


def fourier_features(x, exponents=(6, 7)):
    """VDM's input features sin(2^n pi x), cos(2^n pi x): fine detail of the input mean.
    (B, C, H, W) -> (B, 4C, H, W)."""
    f = torch.cat([2 ** n * math.pi * x for n in exponents], 1)  # (B, 2C, H, W)
    return torch.cat([f.sin(), f.cos()], 1)


class UNet(nn.Module):
    """Psi(mu, t): input mean mu (B, 3, 32, 32) and t (B,); output (B, n_out, 3, 32, 32): the noise eps_hat (n_out = 1,
    continuous) or (mu_eps, ln sigma_eps) (n_out = 2, discretised).
    The U-Net's output features are concatenated with mu, and a linear layer gives each pixel's n_out x 3 outputs.
    With classes > 0, a label y (B,) in 0..classes (classes, or None: no label) adds a learned embedding to the time
    embedding; with classes = 0 and groups = 32 it is the authors' network."""

    def __init__(self, channels=128, res_blocks=32, dropout=0.1, n_out=1, classes=0, groups=32):
        super().__init__()
        c_emb, ch = 4 * channels, channels
        self.channels, self.n_out, self.classes = channels, n_out, classes
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
            emb = emb + self.label_embed(torch.full_like(t, self.classes, dtype=torch.long) if y is None else y)
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


def from_authors(state):
    """A state_dict of the authors' BFN module (`net.` + their names) -> this network's. Their input adapter holds
    only fixed features (not used by this network)."""
    state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    state = {k: v for k, v in state.items() if not k.startswith("input_adapter.")}
    renames = [("output_adapter.output_projection.", "output_projection."), (".resnet_block.", "."),
               ("attn_block.layers.0.", "attn_block.norm."), ("attn_block.layers.1.", "attn_block.qkv."),
               ("attn_block.layers.3.", "attn_block.proj_out.")]
    for old, new in renames:
        state = {k.replace(old, new): v for k, v in state.items()}
    return state




# ----------------------------------------------------------------------------------------------------------------------
# BFN: the network as the output distribution of continuous (§4.6) or discretised (§5.3) data, the losses, the test
# bound and the draw.

def output(net, mu, t, cfg, ctx, y=None):
    """The output distribution's parameters in float32: x_hat (B, 3, 32, 32) for continuous data, (mu_x, sigma_x) for
    discretised, given labels y (B,) of a conditional network."""
    with ctx.autocast:
        out = net(mu, t) if y is None else net(mu, t, y)
    out = out.float()  # (B, 1 or 2, 3, H, W)
    if cfg.output == "continuous":
        return continuous_x_hat(mu, t, out[:, 0], cfg.sigma_1)
    return discretised_output(mu, t, out[:, 0], out[:, 1], cfg.sigma_1)


def loss_inf(x, out, t, cfg):
    """L^inf (§4.12 or §5.5) of x (B, 3, 32, 32) given the output at t. (B,) nats/image."""
    if cfg.output == "continuous":
        return continuous_loss_inf(x, out, t, cfg.sigma_1)
    return discretised_loss_inf(x, discretised_probs(*out, cfg.bins), t, cfg.sigma_1)


def loss_n(x, out, i, n, cfg, generator):
    """L^n (§4.10 or §5.4) of x (B, 3, 32, 32) given the output at t_{i-1}. (B,) nats/image."""
    if cfg.output == "continuous":
        return continuous_loss_n(x, out, i, n, cfg.sigma_1)
    return discretised_loss_n(x, discretised_log_probs(*out, cfg.bins), i, n, cfg.sigma_1, generator)


def recon_loss(x, out, cfg):
    """L^r (§4.13 or §5.6) of x (B, 3, 32, 32) given the output at t = 1. (B,) nats/image. The continuous output is
    scored under N(x_hat, s^2) discretised to the bins, s = sigma_1 for 256 bins and 0.7 sigma_1 for 16 (the
    authors')."""
    if cfg.output == "continuous":
        return continuous_recon_loss(x, out, cfg.sigma_1 if cfg.bins == 256 else 0.7 * cfg.sigma_1, cfg.bins)
    return discretised_recon_loss(x, discretised_log_probs(*out, cfg.bins))


def train_loss(net, batch, cfg, ctx):
    """L^inf (Algorithms 2 and 5) of a batch (x (B, 3, 32, 32), labels (B,) or None): t ~ U(0, 1), mu ~ p_F(. | x; t).
    (B,) nats/image."""
    x, y = batch
    t = stratified_times(len(x), device=x.device) if cfg.t_draw == "stratified" else torch.rand(len(x),
                                                                                               device=x.device)
    mu = continuous_flow(x, t, cfg.sigma_1)
    return loss_inf(x, output(net, mu, t, cfg, ctx, drop_labels(y)), t, cfg)


@torch.no_grad()
def evaluate(net, cfg, ctx, data, step):
    """The test bound -ln p(x) <= L^n + L^r for each n in --eval-n (inf: L^inf) on the first --eval-examples test
    images, over --eval-repeats passes with fresh noise, the steps i of L^n stratified over the images: the mean in
    bits/dim and its standard error over images, in eval.json and the log."""
    images, g = evaluation_set(data["test"], cfg), torch.Generator(ctx.device).manual_seed(hash((cfg.seed, -1, step)) %
                                                                                           2 ** 62)
    out = lambda x, t: output(net, continuous_flow(x, t, cfg.sigma_1, g), t, cfg, ctx)  # noqa: E731
    losses, recon = {n: [] for n in cfg.eval_n}, []
    for _ in range(cfg.eval_repeats):
        steps = {n: stratified_steps(int(n), len(images), g, images.device) for n in cfg.eval_n if n != "inf"}
        for start in range(0, len(images), cfg.batch_size):
            x = quantise(images[start:start + cfg.batch_size], cfg.bins)
            recon.append(recon_loss(x, out(x, torch.ones(len(x), device=x.device)), cfg))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(len(x), generator=g, device=x.device)
                    losses[n].append(loss_inf(x, out(x, t), t, cfg))
                else:
                    i = steps[n][start:start + len(x)]
                    losses[n].append(loss_n(x, out(x, (i - 1) / int(n)), i, int(n), cfg, g))
    report(losses, recon, cfg, ctx, step)


def report(losses, recon, cfg, ctx, step):
    """Per-example losses in nats, pass after pass ({n: [(B,), ...]}, [(B,), ...]) -> the bound in the paper's unit:
    its mean and standard error over examples (each example's passes averaged first), in eval.json and the log."""
    per_example = lambda v: to_unit(torch.cat(v).double().view(cfg.eval_repeats, -1).mean(0), cfg)  # noqa: E731
    recon, result = per_example(recon), {}
    for n, parts in losses.items():
        total = per_example(parts) + recon
        result[n] = {"loss": (total - recon).mean().item(), "recon": recon.mean().item(), "total": total.mean().item(),
                     "stderr": total.std().item() / math.sqrt(len(total)) if len(total) > 1 else float("nan")}
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"step": step, "split": "test", "unit": UNIT, "examples": len(total), "repeats": cfg.eval_repeats,
                   "n": result}, f, indent=1)
    bounds = " | ".join(f"L^{n}+L^r {r['total']:.4g} ± {r['stderr']:.2g} (L^r {r['recon']:.3g})" for n, r in
                        result.items())
    ctx.log(f"test bound at step {step}: {bounds} {UNIT} | eval.json")


SAMPLERS = {"continuous": {"paper": continuous_sample, "ode": continuous_sample_ode, "sde": continuous_sample_sde},
            "discretised": {"paper": discretised_sample, "ode": discretised_sample_ode, "sde": discretised_sample_sde}}


@torch.no_grad()
def draw(net, n, cfg, ctx, generator, trajectory=None, known=None, labels=None):
    """n samples (n, 3, 32, 32) of the --sampler (Algorithm 3 or 6, or the ODE or SDE solver) at --sample-steps, in
    batches of --batch-size. trajectory: a list that records each network call for the first 8 (mu and the prediction
    x_hat or k_hat); known (n, 3, 32, 32): values to condition on, NaN where unknown, by replacement or with --particles
    by sequential Monte Carlo (common.py, Conditioning); labels (n,): the class of each sample, for --guidance and
    --grad-guidance."""
    P, continuous = cfg.particles if known is not None else 1, cfg.output == "continuous"
    guide = train_guide(cfg, ctx) if cfg.grad_guidance and labels is not None else None
    schedule, out = (cfg.sigma_1,) if continuous else (cfg.sigma_1, cfg.bins), []
    for idx in torch.arange(n).split(max(1, cfg.batch_size // P)):
        y = None if labels is None else labels[idx].repeat_interleave(P)
        fn = lambda mu, t: guided_output(net, mu, t, y, cfg, ctx, guide)  # noqa: E731
        if P > 1:
            smc = continuous_sample_smc if continuous else discretised_sample_smc
            out.append(smc(fn, known[idx], cfg.sample_steps, *schedule, P, cfg.sampler == "sde", generator))
            continue
        if known is not None:
            fn = replace_known_x_hat(fn, known[idx]) if continuous else replace_known_probs(fn, torch.where(
                known[idx].isnan(), -1, bin_index(known[idx].nan_to_num(), cfg.bins)))
        if trajectory is not None and idx[0] == 0:  # the prediction recorded: x_hat, or the mean bin k_hat
            fn = recorded(fn, trajectory, 8, None if continuous else lambda p: p @ bin_centres(cfg.bins, p.device))
        out.append(SAMPLERS[cfg.output][cfg.sampler](fn, (len(idx), 3, 32, 32), cfg.sample_steps, *schedule,
                                                     generator=generator, device=ctx.device))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# Beyond the paper: classifier-free guidance of a conditional network, gradient guidance of any network through a
# classifier of the input mean mu, and inpainting.

def drop_labels(y, drop=0.1):
    """Training labels (B,) with a fraction `drop` replaced by the null label 10, so that one network learns both
    p(x | class) and p(x); None (unconditional) stays None."""
    if y is None:
        return None
    return torch.where(torch.rand(len(y), device=y.device) < drop, 10, y)


def guided_output(net, mu, t, y, cfg, ctx, guide=None):
    """What the samplers take, x_hat (continuous) or p_O (discretised), given labels y (B,) (or None). A conditional
    network predicts for the class, with classifier-free guidance w = --guidance (Ho and Salimans, arXiv:2207.12598)
    from one call on the class and the null label together: (1 + w) x_hat(y) - w x_hat(null) (clipped to [-1, 1]), or
    (1 + w) p_O(. | y) - w p_O(. | null), which the ODE and SDE solvers use only through the mean bin k_hat: both guide
    the update of mu (the paper's sampler draws a bin from the positive part). With guide, a classifier of mu and t:
    the mean (x_hat, or mu_x) shifted by w (1 - gamma) grad_mu ln c(y | mu, t), w = --grad-guidance (common.py,
    Guidance)."""
    w = cfg.guidance if cfg.conditional and y is not None else 0
    both = (mu.repeat(2, 1, 1, 1), t.repeat(2), cfg, ctx, torch.cat([y, torch.full_like(y, 10)])) if w else None
    out = output(net, *both) if w else output(net, mu, t, cfg, ctx, y if cfg.conditional else None)
    mean, sigma_x = (out, None) if cfg.output == "continuous" else out
    if guide is not None:
        with torch.enable_grad():
            m = mu.detach().requires_grad_()
            grad, = torch.autograd.grad(guide(guide_input(m, t)).log_softmax(-1).gather(1, y[:, None]).sum(), m)
        k = len(mean) // len(mu)  # 2 with classifier-free guidance
        mean = continuous_guided_x_hat(mean, t.repeat(k), grad.repeat(k, 1, 1, 1), cfg.grad_guidance, cfg.sigma_1)
    pred = mean if cfg.output == "continuous" else discretised_probs(mean, sigma_x, cfg.bins)
    if w:
        pred = (1 + w) * pred[:len(mu)] - w * pred[len(mu):]
    return pred.clamp(-1, 1) if cfg.output == "continuous" else pred


def guide_input(mu, t):
    """What the guidance classifier sees: mu and 2 t - 1 as a fourth channel. (B, 3, H, W), (B,) -> (B, 4, H, W)."""
    return torch.cat([mu, (2 * t - 1)[:, None, None, None].expand(-1, 1, *mu.shape[2:])], 1)


def train_guide(cfg, ctx):
    """The classifier of --grad-guidance: a small CNN of the input mean mu of the Bayesian flow at a random t
    (guide_input) -> the class, trained once (Adam, 2 epochs of the training images' flow at random times, random
    horizontal flips) and cached next to the data."""
    images, labels = load_cifar(cfg.data_dir)["train"]
    crc = zlib.crc32(labels.numpy().tobytes(), zlib.crc32(images.numpy().tobytes()))
    path = os.path.join(cfg.data_dir, "cifar-10-batches-py", f"guide-{crc:08x}-k{cfg.bins}-s{cfg.sigma_1:.4g}.pt")
    torch.manual_seed(2)
    clf = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(64 * 64, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    if os.path.exists(path):
        clf.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return clf.to(ctx.device).eval()
    ctx.log(f"training the guidance classifier on {len(labels):,} images (once; cached as {path})")
    clf, g = clf.to(ctx.device), torch.Generator(ctx.device).manual_seed(2)
    images, labels, optimizer = images.to(ctx.device), labels.long().to(ctx.device), torch.optim.Adam(clf.parameters())
    with torch.enable_grad():  # also when called from inside sampling code
        for idx in torch.cat([torch.randperm(len(images), generator=g, device=ctx.device) for _ in "12"]).split(128):
            x = quantise(images[idx], cfg.bins)
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g, device=x.device) < 0.5, x.flip(-1), x)
            t = torch.rand(len(x), generator=g, device=x.device)
            loss = F.cross_entropy(clf(guide_input(continuous_flow(x, t, cfg.sigma_1, g), t)), labels[idx])
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
def complete(net, cfg, ctx, data):
    """--inpaint: the first --num-samples test images completed where the mask says, given the rest (by replacement, or
    sequential Monte Carlo with --particles): inpaint.png shows each with the missing part grey, the completion and the
    original; inpaint-*.pt holds the completions and the originals' labels (benchmarks/score_samples.py scores them)."""
    if not cfg.inpaint:
        return
    from torchvision.utils import save_image
    n, missing, start = cfg.num_samples, inpaint_mask(cfg, 32, ctx.device), time.time()
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 2)
    original = quantise(data["test"][:n], cfg.bins)  # (n, 3, 32, 32)
    x = draw(net, n, cfg, ctx, g, known=torch.where(missing, float("nan"), original)).clamp(-1, 1)
    rows = torch.stack([torch.where(missing, 0.0, original), x, original], 1).flatten(0, 1)  # the missing part grey
    save_image((rows + 1) / 2, os.path.join(cfg.out_dir, "inpaint.png"), nrow=3 * max(1, round(math.sqrt(n) / 2)),
               pad_value=1)
    name = f"inpaint-{cfg.inpaint if cfg.inpaint in INPAINT_REGIONS else 'mask'}{tag(cfg)}-p{cfg.particles}.pt"
    save_samples(x, data["test_labels"][:n], cfg, name)
    ctx.log(f"inpainting ({cfg.inpaint}, {cfg.sampler}, {cfg.sample_steps} steps, {cfg.particles} particles, "
            f"{time.time() - start:.0f} s): {n} test images completed | inpaint.png, {name}")


# ----------------------------------------------------------------------------------------------------------------------
# Figures: grids and animations of samples, and the samples themselves for benchmarks/score_samples.py.

def sample_labels(cfg, n, device):
    """With --conditional or --sample-class: the class of each of about n samples, each --sample-class (all: every
    class) n / classes times (at least once) in turn, and the columns of a grid with a row per class. Otherwise: None
    and the columns of a square grid of n."""
    if not (cfg.conditional or cfg.sample_class != ("all",)):
        return None, max(1, round(math.sqrt(n)))
    classes = range(10) if "all" in cfg.sample_class else [int(c) for c in cfg.sample_class]
    each = max(1, n // len(classes))
    labels = torch.tensor(list(classes), device=device).repeat_interleave(each)
    return labels, each if each > 1 else max(1, round(math.sqrt(len(labels))))


def tag(cfg):
    """Sampling settings for a file name: -SAMPLER-STEPS, then -gW for --guidance W, -ggW for --grad-guidance W."""
    return f"-{cfg.sampler}-{cfg.sample_steps}" + f"-g{cfg.guidance:g}" * (cfg.guidance != 0) + \
        f"-gg{cfg.grad_guidance:g}" * (cfg.grad_guidance != 0)


def save_samples(x, labels, cfg, name):
    """Samples (N, 3, 32, 32) in [-1, 1] and their classes (N,) or None, with the run's settings, for
    benchmarks/score_samples.py."""
    torch.save({"samples": x.float().cpu(), "labels": None if labels is None else labels.cpu(), "script": SCRIPT,
                "config": dataclasses.asdict(cfg)}, os.path.join(cfg.out_dir, name))


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
def sample(net, cfg, ctx, data):
    """samples.png (a grid of samples; with labels a row per class), samples-SAMPLER-STEPS.pt (tag()), evolution.png
    (for 4 samples, two rows: mu, then the prediction x_hat or the mean bin k_hat, at t = 0, 0.1, ..., 1) and
    evolution.gif (every network call, 8 samples)."""
    if cfg.inpaint:  # --inpaint: the completions of test images instead
        return complete(net, cfg, ctx, data)
    from torchvision.utils import save_image
    g, image = torch.Generator(ctx.device).manual_seed(cfg.seed), lambda v: (v.clamp(-1, 1) + 1) / 2  # noqa: E731
    labels, nrow = sample_labels(cfg, cfg.num_samples, ctx.device)
    trajectory, n = [], cfg.num_samples if labels is None else len(labels)
    x = draw(net, n, cfg, ctx, g, trajectory, labels=labels)
    save_image(image(x), os.path.join(cfg.out_dir, "samples.png"), nrow=nrow, pad_value=1)
    save_samples(x, labels, cfg, f"samples{tag(cfg)}.pt")
    steps = [min(trajectory, key=lambda s: abs(s["t"] - k / 10)) for k in range(11)]
    rows = [s[part][b] for b in range(min(4, len(x))) for part in ("input", "output") for s in steps]
    save_image(image(torch.stack(rows)), os.path.join(cfg.out_dir, "evolution.png"), nrow=11, pad_value=1)
    shown = min(8, len(x))  # evolution.gif: a frame per network call, mu above the prediction, then the samples
    frames = [image(torch.cat([s["input"][:shown], s["output"][:shown]])) for s in trajectory]
    save_gif(frames + [image(torch.cat([x[:shown], x[:shown]]))], shown, os.path.join(cfg.out_dir, "evolution.gif"))
    ctx.log(f"samples ({cfg.sampler}, {cfg.sample_steps} steps): samples.png, samples{tag(cfg)}.pt, evolution.png, "
            "evolution.gif")


# ======================================================================================================================
# Run machinery: the same in every script but for the model line in build(); safe to skip on a first reading. It uses
# from the experiment: SCRIPT, UNIT, BETAS, Config, PRESETS, check, load_data, get_batch, to_unit, from_authors,
# train_loss, evaluate and sample.
# ======================================================================================================================

PREEMPTED = 75  # the exit code after a stop signal: the checkpoint is written; continue with --resume (EX_TEMPFAIL)
MODES = ("preset", "resume", "eval_only", "sample_only", "init_from", "out_dir", "device", "compile")


def parse_args(argv=None, saved=None, strict=True):
    """Command line -> Config: the paper's defaults, then the --preset's, then the checkpoint's (saved), then the flags
    given. A model or data flag other than the checkpoint's: one line; strict: then check() (a bad combination: one
    line)."""
    argv, fields, saved = list(sys.argv[1:] if argv is None else argv), dataclasses.fields(Config), saved or {}
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="paper")
    defaults = {f.name: f.default for f in fields} | PRESETS.get(first.parse_known_args(argv)[0].preset, {}) | {
        k: v for k, v in saved.items() if k not in MODES}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for f, d in ((f, defaults[f.name]) for f in fields if f.metadata["help"]):
        kind = dict(action="store_true") if f.type is bool else dict(nargs="+", type=type(f.default[0])) \
            if f.type is tuple else dict(type=f.type)
        shown = f" (default: {' '.join(map(str, d)) if f.type is tuple else d})" if d else ""
        p.add_argument("--" + f.name.replace("_", "-"), default=d, help=f.metadata["help"] + shown, **kind,
                       **{k: v for k, v in f.metadata.items() if k not in ("help", "fixed")})  # choices
    cfg = Config(**defaults | {k: tuple(v) if isinstance(v, list) else v for k, v in vars(p.parse_args(argv)).items()})
    if differ := [f"--{k.replace('_', '-')} {v} in the checkpoint, {getattr(cfg, k)} now" for k, v in saved.items()
                  if Config.__dataclass_fields__[k].metadata["fixed"] and getattr(cfg, k) != v]:
        raise SystemExit(f"{SCRIPT}: error: the checkpoint was made with other model or data settings: "
                         f"{'; '.join(differ)}. Leave those flags out to use the checkpoint's")
    cfg, problem = check(cfg) if strict else (cfg, None)  # not strict: enough to find the checkpoint and the device
    return p.error(problem) if problem else cfg


def setup(cfg):
    """Device (one not here: one line), autocast, rank of `world` (torchrun); log(line): rank 0 prints it to log.txt."""
    with contextlib.suppress(OSError):  # glibc keeps freed memory: quick MNIST steps about 7% faster (RESULTS)
        [ctypes.CDLL("libc.so.6").mallopt(k, v) for k, v in ((-3, 32 << 20), (-1, 1 << 30), (-2, 256 << 20))]
    world, gpus = int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.device_count()
    here = ["cpu", *[f"cuda:{k}" for k in range(gpus)], *(["mps"] if torch.backends.mps.is_available() else [])]
    mine = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(1, gpus)}"  # this process's GPU
    name = {"auto": mine if gpus else here[-1], "cuda": mine}.get(cfg.device, cfg.device)
    if name not in here:
        raise SystemExit(f"{SCRIPT}: error: --device {cfg.device} is not available here; available: {', '.join(here)}")
    if world > 1:  # the others wait while rank 0 evaluates: a long timeout
        dist.init_process_group("nccl" if "cuda" in name else "gloo", timeout=datetime.timedelta(hours=1))
    rank = dist.get_rank() if world > 1 else 0

    def log(line):
        if rank == 0:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "log.txt"), "a") as f:
                [print(time.strftime("%H:%M:%S ") + line, file=out, flush=True) for out in (sys.stdout, f)]
    return types.SimpleNamespace(device=torch.device(name), rank=rank, world=world, log=log, autocast=torch.autocast(
        name.split(":")[0], torch.bfloat16, enabled="cuda" in name))  # the network in bfloat16 on GPUs


def read_checkpoint(cfg, ctx):
    """--init-from's checkpoint, or <out-dir>/ckpt.pt (ckpt-prev.pt if that is unreadable); weights_only: no code."""
    paths = [cfg.init_from] if cfg.init_from else [os.path.join(cfg.out_dir, n) for n in ("ckpt.pt", "ckpt-prev.pt")]
    for path in filter(os.path.exists, paths):
        try:
            ckpt = torch.load(path, map_location=ctx.device, weights_only=True)
        except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
            ctx.log(f"warning: {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            continue
        if ckpt.get("script", SCRIPT) == SCRIPT:
            return ckpt
        raise SystemExit(f"{SCRIPT}: error: {path} is a checkpoint of {ckpt['script']}; use that script")
    raise SystemExit(f"{SCRIPT}: error: no readable checkpoint: {' or '.join(paths)}")


def build(cfg, ctx, ckpt):
    """The network, its EMA copy (evaluation, sampling) and AdamW (weight decay on weights only), with the checkpoint's
    weights (ours, or the authors'), for --resume also its optimiser; and the first step."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = UNet(cfg.channels, cfg.res_blocks, cfg.dropout, 1 + (cfg.output == "discretised"), 10 * cfg.conditional)
    size = sum(p.numel() for p in model.parameters())
    ctx.log(f"{size / 1e6:.2f}M parameters" + ("" if size < 1e7 or ctx.device.type == "cuda" else ": the size of the "
            "paper's model, meant for GPUs; --preset quick trains a small one in minutes"))
    model, ema = model.to(ctx.device).train(), copy.deepcopy(model).to(ctx.device).eval().requires_grad_(False)
    decay = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}  # not biases, norms
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if (id(p) in decay) == on],
                                    "weight_decay": 0.01 * on} for on in (1, 0)], cfg.lr, BETAS)
    try:
        if ckpt:
            model.load_state_dict(state := ckpt["model"] if "model" in ckpt else from_authors(ckpt))
            ema.load_state_dict(ckpt.get("ema", state))
    except RuntimeError as e:  # tensors missing, unexpected or of other shapes
        sizes = " ".join(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(Config) if f.metadata["fixed"])
        raise SystemExit(f"{SCRIPT}: error: {cfg.init_from or cfg.out_dir} does not fit this network ("
                         f"{(str(e).splitlines()[1:] or [''])[0].strip()[:300]}). Give the flags of its run: {sizes}")
    if ckpt and not cfg.init_from:
        optimizer.load_state_dict(ckpt["optimizer"])
    return model, ema, optimizer, ckpt["step"] if ckpt and not cfg.init_from else 0


def save_checkpoint(cfg, model, ema, optimizer, step):
    """<out-dir>/ckpt.pt through a temporary file, renamed; the previous one kept as ckpt-prev.pt."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "config": dataclasses.asdict(cfg), "script": SCRIPT}, path + ".tmp")
    if os.path.exists(path):
        os.replace(path, os.path.join(cfg.out_dir, "ckpt-prev.pt"))
    os.replace(path + ".tmp", path)


def learning_rate(step, cfg):
    """Of step `step` (from 0): a linear warm-up over lr_warmup steps, then --lr, or a cosine to 0.1 --lr at --steps."""
    decay = min(1.0, max(0, step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup))
    return cfg.lr * min(1, (step + 1) / max(1, cfg.lr_warmup)) * (
        0.55 + 0.45 * math.cos(math.pi * decay) if cfg.lr_decay == "cosine" else 1)


@contextlib.contextmanager
def stop_signals(done):
    """Within: a first SIGTERM, SIGINT or SIGUSR1 says the run stops after this step; a second ends the process."""
    received, stops = [], (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def stop(signum, frame):
        received.append(signal.Signals(signum).name)
        print(f"{received[0]}: stopping after step {done[0] + 1}; a second signal stops at once", flush=True)
        [signal.signal(s, signal.SIG_DFL) for s in stops]
    previous = {s: signal.signal(s, stop) for s in stops}
    try:
        yield received
    finally:
        [signal.signal(s, handler) for s, handler in previous.items()]


def train(cfg, ctx, data, model, ema, optimizer, step):
    """Steps to --steps, a checkpoint every 10 minutes, at the end and on a stop signal; draws from seed and step."""
    net = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) if ctx.world > 1 else model
    net, done, first, last, loss_sum = torch.compile(net) if cfg.compile else net, [step], step, step, 0.0
    clock = saved_at = time.time()
    with stop_signals(done) as received:
        while step < cfg.steps:
            torch.manual_seed(hash((cfg.seed, ctx.rank, step)) % 2 ** 62)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            for k in range(cfg.grad_accum):
                with net.no_sync() if ctx.world > 1 and k < cfg.grad_accum - 1 else contextlib.nullcontext():
                    loss = train_loss(net, get_batch(data, cfg), cfg, ctx).mean() / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():  # EMA with warm-up: the effective decay grows towards 0.9999
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - min(0.9999, (2 + step) / (11 + step)))
            step = done[0] = step + 1
            if not math.isfinite(loss_sum + grad_norm):
                raise SystemExit(f"{SCRIPT}: error: non-finite loss at step {step}; the last checkpoint is untouched")
            flags = torch.tensor([len(received), loss_sum], dtype=torch.float64, device=ctx.device)
            dist.all_reduce(flags) if ctx.world > 1 else None  # a signal to any process; the loss of all
            if step % cfg.log_every == 0 or step in (first + 1, cfg.steps):
                seconds, steps = time.time() - clock, step - last
                ctx.log(f"step {step} | loss {to_unit(flags[1].item() / ctx.world / steps, cfg):.4g} {UNIT} | "
                        f"{steps * cfg.batch_size * cfg.grad_accum * ctx.world / seconds:.1f} examples/s | ETA "
                        f"{(cfg.steps - step) * seconds / steps / 60:.1f} min")
                last, clock, loss_sum = step, time.time(), 0.0
            if ctx.rank == 0 and (flags[0] or step == cfg.steps or time.time() - saved_at > 600):
                save_checkpoint(cfg, model, ema, optimizer, step)
                saved_at = time.time()
            if flags[0]:
                ctx.log(f"stopped by {received[0] if received else 'a signal to another process'} after step {step}: "
                        f"the checkpoint is written; continue with the same command and --resume")
                raise SystemExit(PREEMPTED)
    return step


def main(argv=None):
    """Parse the flags, then train (or only evaluate, or only sample) in the run directory."""
    cfg = parse_args(argv, strict=False)
    ctx = setup(cfg)
    ckpt = read_checkpoint(cfg, ctx) if cfg.init_from or cfg.resume or cfg.eval_only or cfg.sample_only else None
    kept = [f.name for f in dataclasses.fields(Config) if f.metadata["fixed"] or not cfg.init_from]
    cfg = parse_args(argv, {k: v for k, v in ckpt["config"].items() if k in kept} if ckpt and "config" in ckpt else
                     None)
    data, command = load_data(cfg, ctx.device), ["python", SCRIPT, *(sys.argv[1:] if argv is None else argv)]
    ctx.log(f"==== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} | {shlex.join(command)} | {ctx.device} x {ctx.world}")
    model, ema, optimizer, step = build(cfg, ctx, ckpt)
    try:
        step = step if cfg.eval_only or cfg.sample_only else train(cfg, ctx, data, model, ema, optimizer, step)
        if ctx.rank == 0 and not cfg.sample_only:
            evaluate(ema, cfg, ctx, data, step)
        if ctx.rank == 0 and not cfg.eval_only:
            sample(ema, cfg, ctx, data)
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"{SCRIPT}: error: out of memory on {ctx.device}: lower --batch-size {cfg.batch_size} (and "
                         f"raise --grad-accum {cfg.grad_accum} to keep the global batch)")
    ctx.log(f"done: {cfg.out_dir}")
    if ctx.world > 1:
        dist.barrier()  # the other processes wait for rank 0's evaluation and samples
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
