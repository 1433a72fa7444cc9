"""Bayesian Flow Network on text8 characters (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 27.

Trains the authors' non-causal transformer with the continuous-time loss L^inf (Algorithm 8), evaluates the test
bound L^inf + L^r and L^n + L^r in bits/char, and samples text with Algorithm 9. `--text-file PATH` trains on any
UTF-8 text instead: its alphabet is the file's own characters (space and a-z, as text8, if it uses no others), and
beta(1) follows the rule of common.discrete_beta_1 for the alphabet's size K (0.5625, the paper's, for K >= 27;
larger below).

    python bfn_text8.py --preset quick                # a 0.80M-parameter transformer, minutes on a CPU
    python bfn_text8.py                               # the paper's model (170.2M parameters), 128 windows per step
    python bfn_text8.py --grad-accum 26               # the paper's batch, 3328 windows of 256 characters, on one GPU
    torchrun --nproc_per_node=8 bfn_text8.py --batch-size 104 --grad-accum 4     # the paper's batch on 8 GPUs
    python bfn_text8.py --preset quick --text-file book.txt   # any UTF-8 text: its own characters, beta(1) by rule
    python bfn_text8.py --preset quick --sample-only --infill "the ____ of the united states" --sampler ode

Paper: 1.41 bits/char (L^inf + L^r, test set); a uniform model scores log2(27) = 4.75 bits/char.
Measured: --preset quick on the first 12.5M characters of text8, 3.493 ± 0.026 bits/char (all 4,902 test windows);
2 AMD EPYC CPU cores, torch 2.14.1, 2026-11-29.

Data: text8.zip (downloaded into --data-dir and verified: 31,344,016 bytes, inner file 100,000,000 bytes with CRC-32
0x7d6be66f), symbols space = 0, a-z = 1..26, split first 90% / next 5% / last 5% (the standard 90M / 5M / 5M).
Outputs in --out-dir (default runs/bfn_text8): log.txt, ckpt.pt (and ckpt-prev.pt), eval.json, samples.txt
(--num-samples samples of --seq-len characters) and evolution.txt (one sample's most likely characters under the
input theta and under the network's output, at t = 0, 0.1, ..., 1), evolution.gif (the same at every step, for 3
samples). With --eval-samples N, sample quality (spelling, 5-gram bits/char) in eval.json and samples.json (one row
per --sampler and --sample-steps: `--sampler paper ode --sample-steps 10 100` runs each).
Shapes: B batch, L sequence length (--seq-len), K symbols (27 for text8), W transformer width.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import datetime
import itertools
import json
import math
import os
import resource
import signal
import sys
import threading
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

from common import discrete_beta_1, discrete_flow, discrete_loss_inf, discrete_loss_n, discrete_recon_loss, \
    discrete_sample, discrete_sample_ode, discrete_sample_sde, stratified_steps

SCRIPT, UNIT = "bfn_text8.py", "bits/char"

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
    data_dir: str = opt("data", "where text8.zip is downloaded / found")
    text_file: str = opt("", "train on this UTF-8 text file instead of text8")
    alphabet: str = opt("", "the K symbols in order (empty: space and a-z, text8's; with --text-file, the file's own "
                            "characters if it has others); stored with the model", fixed=True)
    seq_len: int = opt(256, "characters per window", fixed=True)
    # BFN
    beta_1: float = opt(0.0, "final accuracy beta(1) of the schedule beta(t) = beta(1) t^2 (§6.8); 0: the rule of "
                             "discrete_beta_1 for K symbols, 0.5625 (the paper's) for K >= 27", fixed=True)
    # network
    layers: int = opt(24, "transformer layers", fixed=True)
    heads: int = opt(12, "attention heads", fixed=True)
    width: int = opt(768, "transformer width", fixed=True)
    # optimisation
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)")
    batch_size: int = opt(128, "windows per process and micro-batch (global: batch size x grad accum x processes)")
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
    eval_examples: int = opt(0, "evaluate on N test windows drawn with a fixed seed (0: all 19,531 of text8)")
    eval_repeats: int = opt(1, "passes over them, each with fresh noise")
    eval_batch_size: int = opt(256, "windows per evaluation batch")
    prompt: str = opt("", "sample continuations of this text (of the alphabet), fixed at the start of every window")
    infill: str = opt("", "fill in the underscores of this text (of the alphabet, and _), fixed at the start of every "
                          "window; the rest of the window is generated too")
    eval_samples: int = opt(0, "sample quality: draw N samples and score them and N test windows by spelling (words "
                               "of the training text) and by a character 5-gram model of the training text")
    sample_steps: tuple = opt((1000,), "generation steps n of Algorithm 9; several: each, with each --sampler")
    num_samples: int = opt(8, "samples in samples.txt")
    sampler: tuple = opt(("paper",), "paper: the paper's sampler; ode: the second-order probability-flow ODE solver; "
                                     "sde: the second-order SDE solver (both for few steps); several: each")
    final: str = opt("sample", "the samplers' result at t = 1: sample (a draw of p_O, the paper's) or mode (its most "
                               "likely value, as the authors' release)")
    # run
    out_dir: str = opt("runs/bfn_text8", "run directory: log.txt, ckpt.pt, eval.json, samples.txt, evolution.txt")
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


# --preset quick: the measured CPU recipe of the README (≈9 minutes on 2 CPU cores); paper: the defaults above.
PRESETS = {"paper": {}, "quick": dict(layers=4, heads=4, width=128, seq_len=128, batch_size=32, lr=1e-3, steps=3000,
                                      eval_every=0, sample_every=0, eval_examples=1000, num_samples=4,
                                      sample_steps=(100,))}


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
    if not cfg.alphabet:  # the text's own characters, or text8's when it has no others
        alphabet = "".join(sorted(set(read_text(cfg.text_file)))) if cfg.text_file else ALPHABET
        cfg = dataclasses.replace(cfg, alphabet=ALPHABET if set(alphabet) <= set(ALPHABET) else alphabet)
    if cfg.beta_1 == 0:
        cfg = dataclasses.replace(cfg, beta_1=discrete_beta_1(len(cfg.alphabet)))
    for bad, message in [
        (len(set(cfg.alphabet)) != len(cfg.alphabet) or not 2 <= len(cfg.alphabet) <= MAX_K,
         f"--alphabet needs 2 to {MAX_K} different symbols, got {len(cfg.alphabet)} ({len(set(cfg.alphabet))} "
         f"different)"),
        (cfg.seq_len < 1, f"--seq-len must be >= 1, got {cfg.seq_len}"),
        (cfg.steps < 0, f"--steps must be >= 0, got {cfg.steps}"),
        (cfg.batch_size < 1 or cfg.grad_accum < 1, "--batch-size and --grad-accum must be >= 1"),
        (min(cfg.layers, cfg.heads, cfg.width) < 1, "--layers, --heads and --width must be >= 1"),
        (cfg.width % cfg.heads != 0 or cfg.width // cfg.heads % 2 != 0,
         f"--width must be a multiple of 2 x --heads, got width {cfg.width} and heads {cfg.heads}"),
        (cfg.beta_1 < 0, f"--beta-1 must be > 0 (0: the rule), got {cfg.beta_1}"),
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
        (bool(cfg.prompt) and bool(cfg.infill), "--prompt and --infill exclude each other"),
        (not set(cfg.prompt) <= set(cfg.alphabet) or not set(cfg.infill) <= set(cfg.alphabet + "_"),
         f"--prompt and --infill take the symbols of the alphabet {cfg.alphabet!r} (and _ for --infill)"),
        (len(cfg.prompt or cfg.infill) > cfg.seq_len,
         f"--prompt or --infill is longer than --seq-len {cfg.seq_len}"),
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
    """The settings whose values differ from the preset's (with the same --text-file and its alphabet, so the file is
    not read again), as '--flag value' strings."""
    text = ["--text-file", cfg.text_file, f"--alphabet={cfg.alphabet}"] if cfg.text_file else []
    base = dataclasses.asdict(parse_args((["--preset", cfg.preset] if cfg.preset else []) + text))
    return [as_flag(k, v) for k, v in dataclasses.asdict(cfg).items() if k != "preset" and v != base[k]]


# ----------------------------------------------------------------------------------------------------------------------
# Data: text8 (or any UTF-8 text) as one tensor of symbols on the device; batches are random windows.

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_BYTES, TEXT8_BYTES, TEXT8_CRC32 = 31_344_016, 100_000_000, 0x7D6BE66F
ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # text8's symbols: symbol k is ALPHABET[k]
MAX_K = 4096  # the most symbols an alphabet may have


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
                    progress = f"\rdownloading {url}: {done / 1e6:.1f} / {total / 1e6:.1f} MB"
                    print(progress, end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    except (requests.RequestException, OSError) as e:
        raise SystemExit(f"{SCRIPT}: error: downloading {url} to {path} failed ({e}). Check the network, or put the "
                         f"file there by hand.")
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
        raise SystemExit(f"{SCRIPT}: error: the text8 in {path} is {len(raw):,} bytes with CRC-32 "
                         f"{zlib.crc32(raw):#010x}, expected {TEXT8_BYTES:,} bytes with CRC-32 "
                         f"{TEXT8_CRC32:#010x}. {fix}")
    return raw


def read_text(path):
    """A UTF-8 text file as str, without one final newline."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise SystemExit(f"{SCRIPT}: error: --text-file {path} does not exist")
    except UnicodeDecodeError as e:
        raise SystemExit(f"{SCRIPT}: error: --text-file {path} is not UTF-8 text (byte {e.start:,}: {e.reason})")
    return text[:-1] if text.endswith("\n") else text


def encode(text, alphabet, source):
    """text (str, or bytes for the a-z alphabet) -> (N,) symbols, uint8 (int16 beyond 256 symbols); a character not
    in the alphabet stops with its position."""
    if isinstance(text, bytes):  # text8's 100M characters: through a byte table
        codes, table = torch.frombuffer(bytearray(text), dtype=torch.uint8).long(), torch.full((256,), -1)
    else:
        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        table = torch.full((max(map(ord, alphabet)) + 1,), -1)
    known = [ord(c) for c in alphabet if ord(c) < len(table)]
    table[known] = torch.tensor([alphabet.index(chr(c)) for c in known], dtype=torch.long)
    x = table[codes.clamp_max(len(table) - 1)].masked_fill(codes >= len(table), -1)
    bad = (x < 0).nonzero()
    if len(bad):
        pos = bad[0].item()
        raise SystemExit(f"{SCRIPT}: error: {source} has the character {chr(codes[pos])!r} at position {pos:,}, which "
                         f"is not in the alphabet {alphabet!r}")
    return x.to(torch.uint8 if len(alphabet) <= 256 else torch.int16)


def load_data(cfg, device):
    """{train, val, test}: (N,) symbols on the device; the first 90%, the next 5%, the last 5%."""
    if cfg.text_file:
        text = read_text(cfg.text_file)
        x = encode(text.encode() if cfg.alphabet == ALPHABET and text.isascii() else text, cfg.alphabet,
                   cfg.text_file)
    else:
        x = encode(load_text8(cfg.data_dir), cfg.alphabet, "text8")
    a, b = len(x) * 90 // 100, len(x) * 95 // 100
    if len(x) - b < cfg.seq_len:
        raise SystemExit(f"{SCRIPT}: error: the text is too short ({len(x):,} characters) for 5% of it to hold a "
                         f"window of --seq-len {cfg.seq_len}")
    return {"train": x[:a].to(device), "val": x[a:b].to(device), "test": x[b:].to(device)}


def get_batch(data, cfg):
    """Random training windows (B, L) of symbols (long), and None (no labels); the global RNG is seeded per step."""
    train = data["train"]
    start = torch.randint(len(train) - cfg.seq_len + 1, (cfg.batch_size, 1), device=train.device)
    return train[start + torch.arange(cfg.seq_len, device=train.device)].long(), None


def swept(cfg):
    """The sampling settings that take several values, each sampled in turn (sample_all)."""
    return ("sampler", "sample_steps")


def evaluation_set(data, cfg):
    """The split cut into non-overlapping windows (N, L); --eval-examples of them drawn with a fixed seed (all if 0)."""
    windows = data[: len(data) // cfg.seq_len * cfg.seq_len].view(-1, cfg.seq_len)
    if cfg.eval_examples and cfg.eval_examples < len(windows):
        keep = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[:cfg.eval_examples]
        windows = windows[keep.sort().values.to(windows.device)]
    return windows


def to_unit(nats, cfg):
    """Nats per example -> the paper's unit, bits/char: nats / (L ln 2)."""
    return nats / (cfg.seq_len * math.log(2))


def decode(x, alphabet):
    """(L,) symbols -> str."""
    return "".join(alphabet[k] for k in x.tolist())


# ----------------------------------------------------------------------------------------------------------------------
# Network: the authors' non-causal transformer for text8 (pre-LN, tanh-GELU), tensor for tensor: their parameter names
# (inside `net.`, see from_authors), shapes and function; attention through scaled_dot_product_attention.

def positions(seq_len, width):
    """Fixed sinusoidal position features (the authors': base 1000): sin(l / 1000^(j / W)) at even j, cos at odd j.
    -> (seq_len, width)."""
    pos = torch.arange(seq_len, dtype=torch.float32)[:, None]  # (L, 1)
    j = torch.arange(width, dtype=torch.float32)
    args = pos / 1000 ** (j / width)  # (L, W)
    return torch.where(j % 2 == 0, args.sin(), args.cos())


class Block(nn.Module):
    """A pre-LayerNorm transformer block: multi-head self-attention over all positions (non-causal), then a tanh-GELU
    MLP, each added to the input."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.ModuleDict(dict(c_attn=nn.Linear(width, 3 * width), c_proj=nn.Linear(width, width)))
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, 4 * width), c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):  # (B, L, W) -> (B, L, W)
        qkv = rearrange(self.attn.c_attn(self.ln_1(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        h = F.scaled_dot_product_attention(*qkv.contiguous())  # (B, heads, L, W / heads); contiguous: fast on CPU
        x = x + self.attn.c_proj(rearrange(h, "b h l d -> b l (h d)"))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class Transformer(nn.Module):
    """Psi(theta, t): input 2 theta - 1 (B, L, K) and t (B,); output K logits per position (B, L, K).
    The input embedding is a linear map of 2 theta - 1, plus fixed positions, plus a linear map of 2 t - 1; the output
    layer reads the final LayerNorm's output and the input embedding side by side."""

    def __init__(self, seq_len=256, layers=24, heads=12, width=768, K=27):
        super().__init__()
        self.inp_embedding, self.t_embedding = nn.Linear(K, width), nn.Linear(1, width)
        self.register_buffer("pos_embedding", positions(seq_len, width), persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_f, self.lm_head = nn.LayerNorm(width), nn.Linear(2 * width, K)
        # initialisation (GPT-2's, as the authors'): linear weights N(0, 0.02), the residual projections N(0, 0.02 /
        # sqrt(2 layers)), zero biases
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x, t):  # (B, L, K), (B,) -> (B, L, K)
        t = (2 * t - 1)[:, None, None]  # (B, 1, 1)
        x = self.inp_embedding(x) + self.pos_embedding[: x.shape[1]] + self.t_embedding(t)  # (B, L, W)
        h = x
        for block in self.blocks:
            h = block(h)
        return self.lm_head(torch.cat([self.ln_f(h), x], -1))


def from_authors(state):
    """A state_dict of the authors' BFN module (`net.` + their names) -> this network's. Their fixed positions are
    recomputed here rather than loaded."""
    state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    state.pop("input_adapter.pos_embedding", None)
    renames = [("input_adapter.", ""), ("transformer.h.", "blocks."), ("transformer.ln_f.", "ln_f.")]
    for old, new in renames:
        state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
    return state


NETWORK_FLAGS = "--layers, --heads, --width, --seq-len"


# ----------------------------------------------------------------------------------------------------------------------
# BFN glue: the network as the output distribution p_O(. | theta, t) of discrete data (§6.4), and the losses.

def output_log_probs(net, theta, t, autocast):
    """ln p_O(k | theta, t): theta (B, L, K), t (B,) -> (B, L, K), a log-softmax over the K logits in float32."""
    with autocast:
        logits = net(2 * theta - 1, t)  # (B, L, K)
    return torch.log_softmax(logits.float(), -1)


def train_loss(net, batch, cfg, autocast):
    """L^inf (§6.7, Algorithm 8) of a batch (x (B, L), None): t ~ U(0, 1), theta ~ p_F(. | x; t). Returns (B,)
    nats/window."""
    x, _ = batch
    t = torch.rand(len(x), device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, len(cfg.alphabet))
    return discrete_loss_inf(x, output_log_probs(net, theta, t, autocast).exp(), t, cfg.beta_1)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and sampling (with the EMA network)

@torch.no_grad()
def evaluate(net, windows, cfg, autocast, seed):
    """Test bound -ln p(x) <= L^n + L^r for each n in --eval-n, in bits/char, over --eval-repeats passes with fresh
    noise; the steps i of L^n are stratified over the examples. windows (N, L) uint8 ->
    {n: {loss, recon, total, stderr}}."""
    g = torch.Generator(windows.device).manual_seed(seed)
    flow = lambda x, t: discrete_flow(x, t, cfg.beta_1, len(cfg.alphabet), g)  # noqa: E731
    log_p = lambda x, t: output_log_probs(net, flow(x, t), t, autocast)  # noqa: E731  ln p_O at theta ~ p_F(. | x; t)
    losses, recon = {n: [] for n in cfg.eval_n}, []
    progress = Progress("evaluating", cfg.eval_repeats * math.ceil(len(windows) / cfg.eval_batch_size))
    for _ in range(cfg.eval_repeats):
        steps = {n: stratified_steps(int(n), len(windows), g, windows.device) for n in cfg.eval_n if n != "inf"}
        for start in range(0, len(windows), cfg.eval_batch_size):
            progress.tick()
            x = windows[start:start + cfg.eval_batch_size].long()
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


def draw(net, n, cfg, autocast, device, generator, trajectory=False, given=None):
    """n samples (n, L) of Algorithm 9 or the ODE solver (--sampler, --sample-steps, --final), in batches of
    --eval-batch-size; with trajectory, one batch and also the trajectory (theta and p_O at each step).
    given (n, L): known symbols (-1 where unknown). There p_O is replaced by the known symbol at every step, so that
    those positions follow the Bayesian flow of their true values, the network sees them as it would in training, and
    it generates the rest consistently (prompts, infilling); this works alike for every sampler."""
    sampler = {"paper": discrete_sample, "ode": discrete_sample_ode, "sde": discrete_sample_sde}[cfg.sampler]
    K = len(cfg.alphabet)
    chunks = [torch.arange(n)] if trajectory else torch.arange(n).split(cfg.eval_batch_size)
    progress = Progress(f"sampling ({cfg.sampler}, {cfg.sample_steps} steps)", len(chunks) * (cfg.sample_steps + 1))

    def run(idx):
        def probs_fn(theta, t):  # p_O(. | theta, t), counting the network calls for the progress line
            progress.tick()
            probs = output_log_probs(net, theta, t, autocast).exp()
            if given is None:
                return probs
            known = given[idx]
            return torch.where(known[..., None] >= 0, F.one_hot(known.clamp_min(0), K).float(), probs)

        return sampler(probs_fn, (len(idx), cfg.seq_len), cfg.sample_steps, cfg.beta_1, K, generator=generator,
                       device=device, return_trajectory=trajectory, final_mode=cfg.final == "mode")

    out = [run(idx) for idx in chunks]
    return out[0] if trajectory else torch.cat(out)


@torch.no_grad()
def sample(net, cfg, autocast, device, out_dir, tag=""):
    """Algorithm 9 (or the ODE solver): samples.txt, evolution.txt (the most likely characters of theta and p_O at
    t = 0, 0.1, ..., 1) and evolution.gif (the same at every step, for 3 samples)."""
    g = torch.Generator(device).manual_seed(cfg.seed)
    x, trajectory = draw(net, cfg.num_samples, cfg, autocast, device, g, trajectory=True)
    decode_line = lambda x: decode(x, cfg.alphabet).replace("\n", "¶")  # noqa: E731  one line, also for new lines
    with open(os.path.join(out_dir, f"samples{tag}.txt"), "w") as f:
        for b in range(len(x)):
            f.write(f"--- sample {b} ({cfg.sample_steps} steps, {cfg.sampler} sampler)\n"
                    f"{decode(x[b], cfg.alphabet)}\n")
    times = [k / 10 for k in range(11)]
    with open(os.path.join(out_dir, f"evolution{tag}.txt"), "w") as f:
        f.write(f"sample 0 over {cfg.sample_steps} steps: the most likely character under the input theta and "
                f"under the output p_O\n")
        for tt in times:
            s = min(trajectory, key=lambda s: abs(s["t"] - tt))
            f.write(f"t={s['t']:.2f} input  |{decode_line(s['input'][0].argmax(-1))}|\n"
                    f"       output |{decode_line(s['output'][0].argmax(-1))}|\n")
        f.write(f"final sample |{decode_line(x[0])}|\n")
    frames = []  # evolution.gif: a frame per step, the most likely characters of theta and p_O of 3 samples
    one_hot = F.one_hot(x, len(cfg.alphabet))
    final = {"t": 1.0, "input": one_hot, "output": one_hot, "label": ", the samples"}
    for s in trajectory + [final]:
        lines = [f"t = {s['t']:.3f}{s.get('label', '')}"]
        for b in range(min(3, cfg.num_samples)):
            for name in ("input", "output"):
                text = decode_line(s[name][b].argmax(-1))
                lines += [f"{name:6} |{text[k:k + 64]}|" for k in range(0, len(text), 64)]
            lines.append("")
        frames.append(lines)
    save_text_gif(frames, os.path.join(out_dir, f"evolution{tag}.gif"))


@torch.no_grad()
def complete(net, data, cfg, ctx, tag=""):
    """--prompt or --infill: --num-samples windows that start with the given text (its underscores, for --infill,
    left to the network, as is everything after it), written to completions.txt; for --infill the log gives the
    fraction of filled-in words that are words of the training text."""
    text = cfg.prompt or cfg.infill
    if not text:
        return
    known = torch.full((cfg.seq_len,), -1, dtype=torch.long)
    for i, c in enumerate(text):
        if c != "_":
            known[i] = cfg.alphabet.index(c)
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 2)
    n = cfg.num_samples
    x = draw(net, n, cfg, ctx.autocast, ctx.device, g, given=known.to(ctx.device).expand(n, -1))
    samples = [decode(row, cfg.alphabet) for row in x]
    kind = "prompt" if cfg.prompt else "infill"
    with open(os.path.join(cfg.out_dir, f"completions{tag}.txt"), "w") as f:
        f.write(f"{kind} |{text}| ({cfg.sampler} sampler, {cfg.sample_steps} steps)\n")
        for b, sample_text in enumerate(samples):
            f.write(f"--- {b}\n{sample_text}\n")
    line = f"{kind} ({cfg.sampler}, {cfg.sample_steps} steps): {n} completions"
    if cfg.infill:
        vocabulary, _ = training_text_models(data["train"], cfg.alphabet)
        filled = [filled_words(text, s) for s in samples]
        words = [w for ws in filled for w in ws]
        right = sum(w in vocabulary for w in words) / len(words) if words else float("nan")
        line += f"; the filled-in words are words of the training text for {right:.1%} of {len(words)}, e.g. " \
                f"{', '.join(filled[0][:5])}"
    ctx.log(line)


def filled_words(pattern, text):
    """The words of text that overlap the underscores of pattern (text has the pattern's known characters)."""
    words, start = [], 0
    for word in text.split(" "):
        end = start + len(word)
        if word and "_" in pattern[start:end]:
            words.append(word)
        start = end + 1
    return words


def save_text_gif(frames, path, max_frames=100):
    """An animated GIF of text, at most max_frames frames evenly spaced (the last one kept, and held): frames, a list
    of lists of lines, drawn black on white in Pillow's default font, one character per fixed-width cell."""
    from PIL import Image, ImageDraw
    keep = sorted({round(k * (len(frames) - 1) / (max_frames - 1)) for k in range(max_frames)}) \
        if len(frames) > max_frames else list(range(len(frames)))
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    pitch = max(measure.textlength(c) for c in set("".join(frames[keep[-1]]) + "w"))  # a fixed advance per character
    width = 8 + round(pitch * max(len(line) for k in keep for line in frames[k]))
    height = 8 + 12 * max(len(frames[k]) for k in keep)
    images = []
    for k in keep:
        image = Image.new("L", (width, height), 255)
        draw_text = ImageDraw.Draw(image)
        for j, line in enumerate(frames[k]):
            for i, c in enumerate(line):
                draw_text.text((4 + round(i * pitch), 4 + 12 * j), c, fill=0)
        images.append(image)
    images[0].save(path, save_all=True, append_images=images[1:], duration=[80] * (len(images) - 1) + [2000], loop=0)


# ----------------------------------------------------------------------------------------------------------------------
# Sample quality (--eval-samples): how many sampled words are real words of the training text, and how likely the
# samples are under a character 5-gram model of the training text; the same figures for real test windows beside them.

def whole_words(text):
    """The words of a window that are whole: split at white space, without the first and the last (cut by the
    edges)."""
    words = text.split()
    return words[1 if text[:1].strip() else 0:len(words) - (1 if text[-1:].strip() else 0)]


class NGram:
    """A character n-gram model of a symbol sequence (N,), interpolated as Witten and Bell do: p_k(c | h) =
    (C(h c) + T(h) p_{k-1}(c | h')) / (C(h) + T(h)), with T(h) the number of distinct symbols seen after h, h' the
    context h without its oldest symbol, and p_0 = 1 / K (x's symbols: 0..K-1)."""

    def __init__(self, x, K, order=5):
        x = x.long().cpu()
        self.order, self.tables, self.K = order, [], K
        for k in range(1, order + 1):  # the k-grams as integers in base K, their contexts as the code // K
            codes = sum(x[j:len(x) - k + 1 + j] * K ** (k - 1 - j) for j in range(k))
            grams, counts = torch.unique(codes, return_counts=True)  # sorted
            contexts, which = torch.unique(grams // K, return_inverse=True)
            context_counts = torch.zeros(len(contexts), dtype=torch.long).index_add_(0, which, counts)
            followers = torch.bincount(which, minlength=len(contexts))
            self.tables.append((grams, counts, contexts, context_counts, followers))

    @staticmethod
    def lookup(keys, values, queries):
        """values[i] where keys[i] == query (keys sorted), else 0."""
        i = torch.searchsorted(keys, queries).clamp(max=len(keys) - 1)
        return torch.where(keys[i] == queries, values[i], torch.zeros_like(values[i]))

    def bits_per_char(self, windows):
        """Mean -log2 p of each symbol given the order - 1 before it, over every position that has them.
        windows (M, L) -> float."""
        w, K = windows.long().cpu(), self.K
        p = torch.full((len(w), w.shape[1] - self.order + 1), 1 / K, dtype=torch.float64)
        for k, (grams, counts, contexts, context_counts, followers) in enumerate(self.tables, start=1):
            start = self.order - k  # the k-gram ending at each scored position
            codes = sum(w[:, start + j:w.shape[1] - k + 1 + j] * K ** (k - 1 - j) for j in range(k))
            c_hc = self.lookup(grams, counts, codes).double()
            c_h = self.lookup(contexts, context_counts, codes // K).double()
            t_h = self.lookup(contexts, followers, codes // K).double()
            p = torch.where(c_h > 0, (c_hc + t_h * p) / (c_h + t_h).clamp_min(1), p)
        return -p.log2().mean().item()


TRAINING_TEXT_MODELS = {}  # (the training split's address, length) -> (its words, its NGram)


def training_text_models(train, alphabet):
    """The set of words of the training split and its character 5-gram model, built once per process: a sampling run
    scores every sampler and step count against the same ones. train (N,) symbols -> (set, NGram)."""
    key = (train.data_ptr(), len(train))
    if key not in TRAINING_TEXT_MODELS:
        ascii_only = max(map(ord, alphabet)) < 128  # text8: one byte per character
        codes = torch.tensor([ord(c) for c in alphabet], dtype=torch.uint8 if ascii_only else torch.int32)
        text = codes[train.cpu().long()].numpy().tobytes().decode("ascii" if ascii_only else "utf-32-le")
        TRAINING_TEXT_MODELS[key] = set(text.split()), NGram(train, len(alphabet))
    return TRAINING_TEXT_MODELS[key]


def text_figures(windows, vocabulary, ngram, alphabet):
    """Spelling accuracy (the fraction of whole words that occur in the training text), the number of words it is
    over, and the bits/char of a 5-gram model of the training text. windows (M, L) -> dict."""
    words = [w for x in windows for w in whole_words(decode(x, alphabet))]
    spelled = sum(w in vocabulary for w in words) / len(words) if words else float("nan")
    return {"spelling_accuracy": spelled, "words": len(words), "ngram_bits_per_char": ngram.bits_per_char(windows)}


def sample_quality(net, data, cfg, ctx):
    """--eval-samples N: N sampled windows (the --sampler at --sample-steps) and N test windows, scored against the
    training split's own vocabulary and 5-gram statistics, so that it works for any --text-file."""
    n = cfg.eval_samples
    test = data["test"][: len(data["test"]) // cfg.seq_len * cfg.seq_len].view(-1, cfg.seq_len)[:n]  # (n, L)
    if len(test) < n:
        raise SystemExit(f"{SCRIPT}: error: --eval-samples {n} needs as many test windows; the test split has "
                         f"{len(test)} of --seq-len {cfg.seq_len}")
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 1)
    start = time.time()
    x = draw(net, n, cfg, ctx.autocast, ctx.device, g)
    seconds = time.time() - start
    vocabulary, ngram = training_text_models(data["train"], cfg.alphabet)
    return {"samples": text_figures(x, vocabulary, ngram, cfg.alphabet),
            "test": text_figures(test, vocabulary, ngram, cfg.alphabet), "seconds": seconds}


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
    model = Transformer(cfg.seq_len, cfg.layers, cfg.heads, cfg.width, len(cfg.alphabet)).to(device)
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
