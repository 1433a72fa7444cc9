"""Bayesian Flow Network on dynamically binarised MNIST (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 2.

Trains the authors' U-Net with the continuous-time loss L^inf (Algorithm 8), evaluates the test bound L^inf + L^r and
L^n + L^r in nats/image (the paper: 77.87), and samples with Algorithm 9 or the ODE or SDE solver of common.py.
Writes log.txt, ckpt.pt, eval.json, samples.png and .pt, and evolution.png/.gif (theta and p_O over time) to --out-dir.

    python bfn_mnist.py --preset quick                    # a small U-Net, minutes on a laptop CPU
    python bfn_mnist.py                                   # the paper's model and optimiser
    torchrun --nproc_per_node=8 bfn_mnist.py --batch-size 64       # the paper's global batch on 8 GPUs
    python bfn_mnist.py --eval-only --eval-n inf 10 25 50 100 784   # the paper's table, from the run directory
    python bfn_mnist.py --sample-only --sampler ode sde --sample-steps 10 --num-samples 500   # then, to score them:
    python benchmarks/score_samples.py runs/bfn_mnist/samples-ode-10.pt runs/bfn_mnist/samples-sde-10.pt
    python bfn_mnist.py --sample-only --inpaint bottom --particles 8       # complete the lower half of test digits
    python bfn_mnist.py --sample-only --grad-guidance 2 --sample-class 3   # steer any model towards a digit
    python bfn_mnist.py --preset quick --digits 2 --steps 960   # 64x64 images of two digits side by side, 24 min

Shapes: B batch, H x W image (28 x 28; 64 x 64 with --digits 2), K = 2 classes (0 white, 1 black ink), C channels.
"""
import argparse, collections, contextlib, copy, ctypes, dataclasses, datetime, gzip, json, math, os, shlex, shutil
import signal, struct, sys, time, types, zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import discrete_flow, discrete_guided_probs, discrete_loss_inf, discrete_loss_n, discrete_recon_loss, \
    discrete_sample, discrete_sample_ode, discrete_sample_sde, discrete_sample_smc, recorded, replace_known_probs, \
    stratified_steps, stratified_times

SCRIPT, UNIT, K, BETAS = "bfn_mnist.py", "nats/image", 2, (0.9, 0.98)  # K: white and black pixels; AdamW's betas


def opt(default, help=None, fixed=False, **kwargs):
    """A setting: its default; its --help (None: not a flag, the presets set it); whether it fixes the model or the
    data (a checkpoint keeps it); argparse's choices."""
    return dataclasses.field(default=default, metadata=dict(help=help, fixed=fixed, **kwargs))


@dataclasses.dataclass
class Config:
    """Every setting of a run; each with help is a flag (--batch-size for batch_size). The defaults are the paper's."""
    data_dir: str = opt("data", "where MNIST is, or is downloaded to (torchvision's layout: DIR/MNIST/raw)")
    digits: int = opt(1, "1: 28x28 MNIST; 2: 64x64 images of two digits side by side", True, choices=(1, 2))
    conditional: bool = opt(False, "the network also sees the label (the digit, or the number 00-99)", True)
    beta_1: float = opt(9.0, "final accuracy beta(1) of the schedule beta(t) = beta(1) t^2 (§6.8)", True)
    channels: int = opt(128, "U-Net base channels (a multiple of 8)", True)
    res_blocks: int = opt(2, "residual blocks per U-Net level", True)
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)")
    batch_size: int = opt(512, "examples per process and step (global: x --grad-accum x processes); also of "
                               "evaluation and sampling")
    grad_accum: int = opt(1, "batches accumulated per optimiser step")
    lr: float = opt(1e-4, "AdamW learning rate (the peak, with the quick preset's schedule)")
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = opt(0, "evaluate on the first N test images (0: all)")
    eval_repeats: int = opt(1, "passes over them with fresh binarisations and noise")
    sampler: str = opt("paper", "Algorithm 9, or the second-order ODE or SDE solver", choices=("paper", "ode", "sde"))
    sample_steps: int = opt(100, "generation steps n")
    num_samples: int = opt(64, "images to sample (samples.png, samples.pt), or test images to complete")
    sample_class: tuple = opt(("all",), "with --conditional or --grad-guidance: the classes to sample, a row each")
    guidance: float = opt(0.0, "classifier-free guidance weight of a --conditional model")
    grad_guidance: float = opt(0.0, "gradient guidance weight towards --sample-class, through a classifier of theta")
    inpaint: str = opt("", "complete test images: top, bottom, left, right, centre, or a mask image (white: generate)")
    particles: int = opt(1, "with --inpaint: sequential Monte Carlo over P particles (1: replacement)")
    preset: str = opt("paper", "the paper's settings, or a small CPU recipe; flags given win",
                      choices=("paper", "quick"))
    out_dir: str = opt("runs/bfn_mnist", "the run directory")
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
    dropout: float = opt(0.5)  # in the residual blocks
    lr_warmup: int = opt(0)  # steps of linear learning-rate warm-up (the paper: none)
    lr_decay: str = opt("none")  # cosine: down to 0.1 --lr at --steps (the paper: constant)


PRESETS = {"paper": {}, "quick": dict(channels=32, res_blocks=1, dropout=0.0, lr=1e-3, lr_warmup=100, lr_decay="cosine",
                                      batch_size=32, steps=1600, eval_examples=2000)}
INPAINT_REGIONS = ("top", "bottom", "left", "right", "centre")
GROUPS = 32  # GroupNorm groups at most (the authors')


def check(cfg):
    """The settings that depend on each other -> (cfg, with every class for --grad-guidance without --sample-class;
    the first problem, a one-line message, or None)."""
    classes = 10 ** cfg.digits
    if cfg.grad_guidance and cfg.sample_class == ("all",) and not cfg.conditional:
        cfg = dataclasses.replace(cfg, sample_class=tuple(map(str, range(classes))))
    return cfg, next((message for bad, message in [
        *[(getattr(cfg, k) < 1, f"--{k.replace('_', '-')} must be at least 1, got {getattr(cfg, k)}") for k in (
            "batch_size", "grad_accum", "eval_repeats", "sample_steps", "num_samples", "particles", "log_every")],
        (cfg.beta_1 <= 0 or cfg.lr <= 0 or cfg.guidance < -1 or cfg.grad_guidance < 0, "--beta-1 and --lr must be "
         "positive, --guidance at least -1, --grad-guidance at least 0"),
        (cfg.channels < 8 or cfg.channels % 8 or cfg.res_blocks < 1, "--channels must be a multiple of 8 and "
         f"--res-blocks at least 1, got {cfg.channels} and {cfg.res_blocks}"),
        (any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n),
         f"--eval-n takes inf or positive integers, got {' '.join(cfg.eval_n)}"),
        (cfg.conditional and GROUPS % (2 * cfg.channels) == 0, "--conditional needs a U-Net level with more channels "
         f"than its {GROUPS} GroupNorm groups, or the normalisation erases the label: raise --channels"),
        (cfg.guidance and not cfg.conditional, "--guidance needs a --conditional model"),
        (cfg.sample_class != ("all",) and not (cfg.conditional or cfg.grad_guidance),
         "--sample-class needs a --conditional model or --grad-guidance"),
        (any(c != "all" and not (c.isdigit() and int(c) < classes) for c in cfg.sample_class),
         f"--sample-class takes all or classes 0..{classes - 1}, got {' '.join(cfg.sample_class)}"),
        (cfg.inpaint not in ("", *INPAINT_REGIONS) and not os.path.isfile(cfg.inpaint),
         f"--inpaint takes {', '.join(INPAINT_REGIONS)} or a mask image, and {cfg.inpaint} is neither (no such file)"),
        (cfg.particles > 1 and not cfg.inpaint, "--particles is for --inpaint"),
        (cfg.particles > 1 and cfg.sampler == "ode", "--particles needs a stochastic sampler (paper, sde): the ODE "
         "solver is deterministic after its first draw, so there is nothing to reweight"),
        (cfg.eval_only and cfg.sample_only, "--eval-only and --sample-only exclude each other"),
        (cfg.resume and bool(cfg.init_from), "--resume and --init-from exclude each other")] if bad), None)


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
    t = stratified_times(len(x), device=x.device) if cfg.t_draw == "stratified" else torch.rand(len(x),
                                                                                               device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, K)
    return discrete_loss_inf(x, output_log_probs(net, theta, t, ctx, drop_labels(y, cfg)).exp(), t, cfg.beta_1)


@torch.no_grad()
def evaluate(net, cfg, ctx, data, step):
    """The test bound -ln p(x) <= L^n + L^r (§6.6, §6.9) for each n in --eval-n (inf: L^inf, §6.7) on the first
    --eval-examples test images, over --eval-repeats passes with fresh binarisations and noise, the steps i of L^n
    stratified over the images: the mean in nats/image and its standard error over images, in eval.json and the log."""
    images, g = evaluation_set(data["test"], cfg), torch.Generator(ctx.device).manual_seed(hash((cfg.seed, -1, step)) %
                                                                                           2 ** 62)
    log_p = lambda x, t: output_log_probs(net, discrete_flow(x, t, cfg.beta_1, K, g), t, ctx)  # noqa: E731
    losses, recon = {n: [] for n in cfg.eval_n}, []
    for _ in range(cfg.eval_repeats):
        steps = {n: stratified_steps(int(n), len(images), g, images.device) for n in cfg.eval_n if n != "inf"}
        for start in range(0, len(images), cfg.batch_size):
            x = binarise(images[start:start + cfg.batch_size], g)
            recon.append(discrete_recon_loss(x, log_p(x, torch.ones(len(x), device=x.device))))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(len(x), generator=g, device=x.device)
                    losses[n].append(discrete_loss_inf(x, log_p(x, t).exp(), t, cfg.beta_1))
                else:
                    i = steps[n][start:start + len(x)]
                    losses[n].append(discrete_loss_n(x, log_p(x, (i - 1) / int(n)), i, int(n), cfg.beta_1, g))
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


SAMPLERS = {"paper": discrete_sample, "ode": discrete_sample_ode, "sde": discrete_sample_sde}


@torch.no_grad()
def draw(net, n, cfg, ctx, generator, trajectory=None, known=None, labels=None):
    """n samples (n, H, W) of the --sampler (Algorithm 9, or the ODE or SDE solver) at --sample-steps, in batches of
    --batch-size. trajectory: a list that records each network call for the first 8 (theta and p_O); known (n, H, W):
    pixels to condition on, -1 where unknown, by replacement or with --particles by sequential Monte Carlo (common.py,
    Conditioning); labels (n,): the class of each sample, for --guidance and --grad-guidance."""
    size, P = 64 if cfg.digits == 2 else 28, cfg.particles if known is not None else 1
    guide = train_guide(cfg, ctx) if cfg.grad_guidance and labels is not None else None
    chunks = torch.arange(n).split(max(1, cfg.batch_size // P))
    out = []
    for idx in chunks:
        y = None if labels is None else labels[idx].repeat_interleave(P)
        fn = lambda theta, t: guided_probs(net, theta, t, y, cfg, ctx, guide)  # noqa: E731
        if P > 1:
            out.append(discrete_sample_smc(fn, known[idx], cfg.sample_steps, cfg.beta_1, K, P, cfg.sampler == "sde",
                                           generator))
            continue
        fn = fn if known is None else replace_known_probs(fn, known[idx])
        fn = fn if trajectory is None or idx[0] > 0 else recorded(fn, trajectory, rows=8)
        out.append(SAMPLERS[cfg.sampler](fn, (len(idx), size, size), cfg.sample_steps, cfg.beta_1, K,
                                         generator=generator, device=ctx.device))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# Beyond the paper: classifier-free guidance of a conditional network, gradient guidance of any network through a
# classifier of the input theta, and inpainting.

def drop_labels(y, cfg, drop=0.1):
    """Training labels (B,) with a fraction `drop` replaced by the null label (10 for digits, 100 for numbers), so that
    one network learns both p(x | class) and p(x); None (unconditional) stays None."""
    if y is None:
        return None
    return torch.where(torch.rand(len(y), device=y.device) < drop, 10 ** cfg.digits, y)


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


def train_guide(cfg, ctx):
    """The classifier of --grad-guidance: a small CNN of the input theta of the Bayesian flow at a random t
    (guide_input) -> the label (the digit, or the number 00-99), trained once (Adam, 2 epochs of the training images'
    flow at random times) and cached next to the data."""
    images, labels = load_mnist(cfg.data_dir)["train"]
    crc = zlib.crc32(labels.numpy().tobytes(), zlib.crc32(images.numpy().tobytes()))
    path = os.path.join(cfg.data_dir, "MNIST", f"guide-{crc:08x}-d{cfg.digits}-s{cfg.seed}-b{cfg.beta_1:g}.pt")
    torch.manual_seed(2)
    clf = nn.Sequential(nn.Conv2d(2, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(49 * 64, 128), nn.ReLU(),
                        nn.Linear(128, 10 ** cfg.digits))
    if os.path.exists(path):
        clf.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return clf.to(ctx.device).eval()
    if cfg.digits == 2:
        images, labels = two_digit_images(images, labels, 60_000, cfg.seed)
    ctx.log(f"training the guidance classifier on {len(labels):,} images (once; cached as {path})")
    clf, g = clf.to(ctx.device), torch.Generator(ctx.device).manual_seed(2)
    images, labels, optimizer = images.to(ctx.device), labels.long().to(ctx.device), torch.optim.Adam(clf.parameters())
    with torch.enable_grad():  # also when called from inside sampling code
        for idx in torch.cat([torch.randperm(len(images), generator=g, device=ctx.device) for _ in "12"]).split(128):
            x, t = binarise(images[idx], g), torch.rand(len(idx), generator=g, device=ctx.device)
            loss = F.cross_entropy(clf(guide_input(discrete_flow(x, t, cfg.beta_1, K, g)[..., 1], t)), labels[idx])
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
    original; inpaint.pt holds the completions and the originals' labels (benchmarks/score_samples.py scores them)."""
    if not cfg.inpaint:
        return
    from torchvision.utils import save_image
    n, missing, start = cfg.num_samples, inpaint_mask(cfg, data["test"].shape[-1], ctx.device), time.time()
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 2)
    original = binarise(data["test"][:n], g)
    x = draw(net, n, cfg, ctx, g, known=torch.where(missing, -1, original))
    rows = torch.stack([torch.where(missing, 0.5, 1 - original.float()), 1 - x.float(), 1 - original.float()], 1)
    save_image(rows.flatten(0, 1)[:, None], os.path.join(cfg.out_dir, "inpaint.png"),
               nrow=3 * max(1, round(math.sqrt(n) / 2)), pad_value=0.5)  # ink black, missing grey
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
    classes = range(10 ** cfg.digits) if "all" in cfg.sample_class else [int(c) for c in cfg.sample_class]
    each = max(1, n // len(classes))
    labels = torch.tensor(list(classes), device=device).repeat_interleave(each)
    return labels, each if each > 1 else max(1, round(math.sqrt(len(labels))))


def tag(cfg):
    """Sampling settings for a file name: -SAMPLER-STEPS, then -gW for --guidance W, -ggW for --grad-guidance W."""
    return f"-{cfg.sampler}-{cfg.sample_steps}" + f"-g{cfg.guidance:g}" * (cfg.guidance != 0) + \
        f"-gg{cfg.grad_guidance:g}" * (cfg.grad_guidance != 0)


def save_samples(x, labels, cfg, name):
    """Samples (N, H, W) and their classes (N,) or None, with the run's settings, for benchmarks/score_samples.py."""
    torch.save({"samples": x.to(torch.uint8).cpu(), "labels": None if labels is None else labels.cpu(),
                "script": SCRIPT, "config": dataclasses.asdict(cfg)}, os.path.join(cfg.out_dir, name))


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
    (for 4 samples, two rows: theta of a black pixel, then p_O, at t = 0, 0.1, ..., 1) and evolution.gif (every network
    call, 8 samples)."""
    if cfg.inpaint:  # --inpaint: the completions of test images instead
        return complete(net, cfg, ctx, data)
    from torchvision.utils import save_image
    labels, nrow = sample_labels(cfg, cfg.num_samples, ctx.device)
    trajectory, n = [], cfg.num_samples if labels is None else len(labels)
    x = draw(net, n, cfg, ctx, torch.Generator(ctx.device).manual_seed(cfg.seed), trajectory, labels=labels)
    save_image(1 - x[:, None].float(), os.path.join(cfg.out_dir, "samples.png"), nrow=nrow, pad_value=0.5)
    save_samples(x, labels, cfg, f"samples{tag(cfg)}.pt")
    steps = [min(trajectory, key=lambda s: abs(s["t"] - k / 10)) for k in range(11)]
    rows = [s[part][b, ..., 1] for b in range(min(4, len(x))) for part in ("input", "output") for s in steps]
    save_image(1 - torch.stack(rows)[:, None], os.path.join(cfg.out_dir, "evolution.png"), nrow=11, pad_value=0.5)
    shown = min(8, len(x))  # evolution.gif: a frame per network call, theta above p_O, then the samples
    frames = [1 - torch.cat([s["input"][:shown, ..., 1], s["output"][:shown, ..., 1]])[:, None] for s in trajectory]
    save_gif(frames + [1 - torch.cat([x[:shown], x[:shown]]).float()[:, None]], shown,
             os.path.join(cfg.out_dir, "evolution.gif"))
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
    model = UNet(cfg.channels, (1, 2, 2), cfg.res_blocks, cfg.dropout, 10 ** cfg.digits if cfg.conditional else 0)
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
