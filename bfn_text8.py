"""Bayesian Flow Network on text8 characters (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 27.

Trains the paper's non-causal transformer with the continuous-time loss L^inf (Algorithm 8), evaluates the test
bound L^inf + L^r and L^n + L^r in bits/char, and samples text with Algorithm 9. `--text-file PATH` trains on any
text made of spaces and the letters a-z instead of text8.

    python bfn_text8.py                               # the paper's model (171.5M parameters), 128 windows per step
    python bfn_text8.py --grad-accum 26               # the paper's batch, 3328 windows of 256 characters, on one GPU
    torchrun --nproc_per_node=8 bfn_text8.py --batch-size 104 --grad-accum 4     # the paper's batch on 8 GPUs
    python bfn_text8.py --layers 4 --heads 4 --width 128 --seq-len 128 --batch-size 32 --lr 1e-3 --steps 3000 \\
        --eval-every 0 --sample-every 0 --eval-examples 1000 --num-samples 4 --sample-steps 100   # 9 min on 2 CPU cores

Paper: 1.41 bits/char (L^inf + L^r, test set); a uniform model scores log2(27) = 4.75 bits/char.
Measured with this script (README.md has the details): the small command above on the first 12.5M characters of text8
(--text-file), 0.85M parameters, 2 Xeon CPU cores: 195 windows/s, test L^inf + L^r = 4.20 ± 0.06 bits/char.

Data: text8.zip (downloaded into --data-dir and verified: 31,344,016 bytes, inner file 100,000,000 bytes with CRC-32
0x7d6be66f), symbols space = 0, a-z = 1..26, split first 90% / next 5% / last 5% (the standard 90M / 5M / 5M).
Outputs in --out-dir (default runs/bfn_text8): log.txt, ckpt.pt, eval.json, samples.txt (--num-samples samples of
--seq-len characters) and evolution.txt (one sample's most likely characters under the input theta and under the
network's output, at t = 0, 0.1, ..., 1).
Shapes: B batch, L sequence length (--seq-len), K = 27 symbols, W transformer width.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import resource
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import discrete_flow, discrete_loss_inf, discrete_loss_n, discrete_recon_loss, discrete_sample, discrete_sample_ode

SCRIPT, UNIT = "bfn_text8.py", "bits/char"
K = 27  # space and a-z

# ----------------------------------------------------------------------------------------------------------------------
# Config: every field is a command-line flag (--batch-size for batch_size); defaults are the paper's.


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    data_dir: str = opt("data", "where text8.zip is downloaded / found")
    text_file: str = opt("", "train on this text file (spaces and a-z only) instead of text8")
    seq_len: int = opt(256, "characters per window")
    # BFN
    beta_1: float = opt(0.5625, "final accuracy beta(1) of the discrete schedule beta(t) = beta(1) t^2 (§6.8)")
    # network
    layers: int = opt(24, "transformer layers")
    heads: int = opt(12, "attention heads")
    width: int = opt(768, "transformer width")
    # optimisation
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)")
    batch_size: int = opt(128, "windows per process per micro-batch (global batch: batch size x grad accum x processes)")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    lr: float = opt(1e-4, "AdamW learning rate (constant)")
    betas: tuple = opt((0.9, 0.98), "AdamW betas")
    weight_decay: float = opt(0.01, "AdamW weight decay (weights of linear layers only)")
    grad_clip: float = opt(5.0, "clip the gradient norm to this")
    ema_decay: float = opt(0.9999, "EMA decay of the weights used to evaluate and sample (warmed up)")
    # evaluation and sampling
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test losses L^n + L^r ('inf': continuous time)")
    eval_examples: int = opt(0, "evaluate on N test windows drawn with a fixed seed (0: all 19,531 of text8)")
    eval_batch_size: int = opt(256, "windows per evaluation batch")
    sample_steps: int = opt(1000, "generation steps n of Algorithm 9")
    num_samples: int = opt(8, "samples in samples.txt")
    sampler: str = opt("paper", "paper: the paper's sampler; ode: the second-order probability-flow ODE solver (fast)")
    # run
    out_dir: str = opt("runs/bfn_text8", "run directory: log.txt, ckpt.pt, eval.json, samples.txt, evolution.txt")
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
        (cfg.seq_len < 1, f"--seq-len must be >= 1, got {cfg.seq_len}"),
        (cfg.steps < 0, f"--steps must be >= 0, got {cfg.steps}"),
        (cfg.batch_size < 1 or cfg.grad_accum < 1, "--batch-size and --grad-accum must be >= 1"),
        (min(cfg.layers, cfg.heads, cfg.width) < 1, "--layers, --heads and --width must be >= 1"),
        (cfg.width % cfg.heads != 0 or cfg.width // cfg.heads % 2 != 0,
         f"--width must be a multiple of 2 x --heads, got width {cfg.width} and heads {cfg.heads}"),
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
# Data: text8 (or any a-z text) as one uint8 tensor of symbols on the device; batches are random windows.

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_BYTES, TEXT8_BYTES, TEXT8_CRC32 = 31_344_016, 100_000_000, 0x7D6BE66F
ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # symbol k is ALPHABET[k]


def download(url, path):
    """Stream url to path (through path.part, renamed when complete), printing a progress line."""
    import requests
    try:
        with requests.get(url, stream=True, timeout=60) as r:
            r.raise_for_status()
            total, done = int(r.headers.get("content-length", 0)), 0
            with open(path + ".part", "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    print(f"\rdownloading {url}: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except (requests.RequestException, OSError) as e:
        raise SystemExit(f"{SCRIPT}: error: downloading {url} to {path} failed ({e}). Check the network, or put the file there by hand.")
    os.replace(path + ".part", path)


def load_text8(data_dir):
    """The 100,000,000 characters of text8 as bytes, downloaded into data_dir/text8.zip if missing, then verified."""
    path = os.path.join(data_dir, "text8.zip")
    if not os.path.exists(path):
        os.makedirs(data_dir, exist_ok=True)
        download(TEXT8_URL, path)
    fix = f"Delete {path} and run again to download it afresh."
    if os.path.getsize(path) != TEXT8_ZIP_BYTES:
        raise SystemExit(f"{SCRIPT}: error: {path} is {os.path.getsize(path):,} bytes, expected {TEXT8_ZIP_BYTES:,}: "
                         f"the download is truncated or corrupt. {fix}")
    try:
        with zipfile.ZipFile(path) as z:
            raw = z.read("text8")  # zipfile checks the member's CRC-32 as it reads
    except (zipfile.BadZipFile, zlib.error, KeyError, OSError, EOFError) as e:
        raise SystemExit(f"{SCRIPT}: error: {path} is not a valid text8 archive ({e}). {fix}")
    if len(raw) != TEXT8_BYTES or zlib.crc32(raw) != TEXT8_CRC32:
        raise SystemExit(f"{SCRIPT}: error: the text8 in {path} is {len(raw):,} bytes with CRC-32 {zlib.crc32(raw):#010x}, "
                         f"expected {TEXT8_BYTES:,} bytes with CRC-32 {TEXT8_CRC32:#010x}. {fix}")
    return raw


def encode(raw, source):
    """bytes of spaces and a-z -> (N,) uint8 symbols; any other character stops with its position."""
    lut = torch.full((256,), 255, dtype=torch.uint8)
    lut[list(ALPHABET.encode())] = torch.arange(K, dtype=torch.uint8)
    x = lut[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]
    bad = (x == 255).nonzero()
    if len(bad):
        pos = bad[0].item()
        raise SystemExit(f"{SCRIPT}: error: {source} has the character {chr(raw[pos])!r} (byte {raw[pos]}) at position {pos:,}; "
                         f"only spaces and the letters a-z are allowed")
    return x


def load_data(cfg, device):
    """{train, val, test}: (N,) uint8 symbols on the device; the first 90%, the next 5%, the last 5%."""
    if cfg.text_file:
        if not os.path.exists(cfg.text_file):
            raise SystemExit(f"{SCRIPT}: error: --text-file {cfg.text_file} does not exist")
        with open(cfg.text_file, "rb") as f:
            raw = f.read()
        x = encode(raw[:-1] if raw.endswith(b"\n") else raw, cfg.text_file)  # one final newline is allowed
    else:
        x = encode(load_text8(cfg.data_dir), "text8")
    a, b = len(x) * 90 // 100, len(x) * 95 // 100
    if len(x) - b < cfg.seq_len:
        raise SystemExit(f"{SCRIPT}: error: the text is too short ({len(x):,} characters) for 5% of it to hold a window of "
                         f"--seq-len {cfg.seq_len}")
    return {"train": x[:a].to(device), "val": x[a:b].to(device), "test": x[b:].to(device)}


def get_batch(data, cfg):
    """Random windows (B, L) of symbols (long); the global RNG is seeded per step."""
    start = torch.randint(len(data) - cfg.seq_len + 1, (cfg.batch_size, 1), device=data.device)
    return data[start + torch.arange(cfg.seq_len, device=data.device)].long()


def eval_examples(data, cfg):
    """The evaluation set: the split cut into non-overlapping windows (N, L); --eval-examples of them drawn with a
    fixed seed (all if 0)."""
    windows = data[: len(data) // cfg.seq_len * cfg.seq_len].view(-1, cfg.seq_len)
    if cfg.eval_examples and cfg.eval_examples < len(windows):
        keep = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:cfg.eval_examples]
        windows = windows[keep.sort().values.to(windows.device)]
    return windows


def decode(x):
    """(L,) symbols -> str."""
    return "".join(ALPHABET[k] for k in x.tolist())


# ----------------------------------------------------------------------------------------------------------------------
# Network: the paper's non-causal transformer (pre-LN, GELU), attention through scaled_dot_product_attention.

def time_embedding(t, dim):
    """Sinusoidal features of 1000 t. (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = 1000 * t.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], -1)


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):  # (B, L, W) -> (B, L, W)
        qkv = rearrange(self.qkv(self.ln1(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        x = x + self.proj(rearrange(F.scaled_dot_product_attention(*qkv.contiguous()), "b h l d -> b l (h d)"))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Psi(theta, t): input 2 theta - 1 (B, L, K) and t (B,); output K logits per position (B, L, K)."""

    def __init__(self, seq_len=256, layers=24, heads=12, width=768):
        super().__init__()
        self.width = width
        self.inp = nn.Linear(K, width)
        self.pos = nn.Parameter(torch.zeros(seq_len, width))
        self.time = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_f, self.out = nn.LayerNorm(width), nn.Linear(width, K)
        # initialisation (GPT-2's): weights N(0, 0.02), the residual projections scaled by 1/sqrt(2 layers),
        # zero biases; the output layer starts at zero, so the untrained network predicts the uniform distribution
        for name, p in self.named_parameters():
            if p.dim() > 1:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.zeros_(self.out.weight)

    def forward(self, x, t):  # (B, L, K), (B,) -> (B, L, K)
        h = self.inp(x) + self.pos[: x.shape[1]] + self.time(time_embedding(t, self.width))[:, None]
        for block in self.blocks:
            h = block(h)
        return self.out(self.ln_f(h))


# ----------------------------------------------------------------------------------------------------------------------
# BFN glue: the network as the output distribution p_O(. | theta, t) of discrete data (§6.4), and the losses.

def output_probs(net, theta, t, autocast):
    """p_O(k | theta, t): theta (B, L, K), t (B,) -> probs (B, L, K), a softmax over the K logits in float32."""
    with autocast:
        logits = net(2 * theta - 1, t)
    return torch.softmax(logits.float(), -1)


def train_loss(net, x, cfg, autocast):
    """L^inf (§6.7, Algorithm 8) of a batch x (B, L): t ~ U(0, 1), theta ~ p_F(. | x; t). Returns (B,) nats/window."""
    t = torch.rand(len(x), device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, K)
    return discrete_loss_inf(x, output_probs(net, theta, t, autocast), t, cfg.beta_1)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and sampling (with the EMA network)

@torch.no_grad()
def evaluate(net, windows, cfg, autocast, seed):
    """Test bound -ln p(x) <= L^n + L^r for each n in --eval-n, in bits/char (nats per window / (L ln 2))."""
    g = torch.Generator(windows.device).manual_seed(seed)
    losses, recon = {n: [] for n in cfg.eval_n}, []
    for batch in windows.split(cfg.eval_batch_size):
        x, B = batch.long(), len(batch)
        ones = torch.ones(B, device=x.device)
        recon.append(discrete_recon_loss(x, output_probs(net, discrete_flow(x, ones, cfg.beta_1, K, g), ones, autocast)))
        for n in cfg.eval_n:
            if n == "inf":
                t = torch.rand(B, generator=g, device=x.device)
                probs = output_probs(net, discrete_flow(x, t, cfg.beta_1, K, g), t, autocast)
                losses[n].append(discrete_loss_inf(x, probs, t, cfg.beta_1))
            else:
                i = torch.randint(1, int(n) + 1, (B,), generator=g, device=x.device)
                t = (i - 1) / int(n)
                probs = output_probs(net, discrete_flow(x, t, cfg.beta_1, K, g), t, autocast)
                losses[n].append(discrete_loss_n(x, probs, i, int(n), cfg.beta_1, g))
    scale = 1 / (cfg.seq_len * math.log(2))
    recon = torch.cat(recon).double() * scale
    result = {}
    for n, v in losses.items():
        total = torch.cat(v).double() * scale + recon
        result[n] = {"loss": (total - recon).mean().item(), "recon": recon.mean().item(), "total": total.mean().item(),
                     "stderr": (total.std() / math.sqrt(len(total))).item() if len(total) > 1 else float("nan")}
    return result


@torch.no_grad()
def sample(net, cfg, autocast, device, out_dir):
    """Algorithm 9 (or the ODE solver): samples.txt and evolution.txt (the most likely characters of theta and p_O at t = 0, 0.1, ..., 1)."""
    g = torch.Generator(device).manual_seed(cfg.seed)
    sampler = discrete_sample if cfg.sampler == "paper" else discrete_sample_ode
    x, trajectory = sampler(lambda theta, t: output_probs(net, theta, t, autocast), (cfg.num_samples, cfg.seq_len),
                            cfg.sample_steps, cfg.beta_1, K, generator=g, device=device, return_trajectory=True)
    with open(os.path.join(out_dir, "samples.txt"), "w") as f:
        f.write("".join(f"--- sample {b} ({cfg.sample_steps} steps, {cfg.sampler} sampler)\n{decode(x[b])}\n" for b in range(len(x))))
    times = [k / 10 for k in range(11)]
    with open(os.path.join(out_dir, "evolution.txt"), "w") as f:
        f.write(f"sample 0 over {cfg.sample_steps} steps: the most likely character under the input theta and under the "
                f"output p_O\n")
        for tt in times:
            s = min(trajectory, key=lambda s: abs(s["t"] - tt))
            f.write(f"t={s['t']:.2f} input  |{decode(s['input'][0].argmax(-1))}|\n"
                    f"       output |{decode(s['output'][0].argmax(-1))}|\n")
        f.write(f"final sample |{decode(x[0])}|\n")


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
    model = Transformer(cfg.seq_len, cfg.layers, cfg.heads, cfg.width).to(device)
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
            log(f"step {step} | loss {loss_sum.item() / n / (cfg.seq_len * math.log(2)):.3f} {UNIT} | {n * cfg.batch_size * cfg.grad_accum * world / dt:.1f} examples/s | "
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
