"""Bayesian Flow Network on text8 characters (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 27.

Trains the authors' transformer with L^inf (Algorithm 8), evaluates the test bound L^n + L^r in bits/char (the paper:
1.41, continuous time), samples with Algorithm 9 or common.py's ODE or SDE solver; any UTF-8 text (--text-file), as
characters or K subword tokens (--vocab K). Writes log.txt, ckpt.pt, eval.json, samples.txt/.pt, evolution.txt/.gif.

    python bfn_text8.py --preset quick --text-file book.txt   # a small transformer on any text, minutes on a CPU
    python bfn_text8.py --steps 1000                          # the paper's model and optimiser (text8 downloaded)
    torchrun --nproc_per_node=8 bfn_text8.py --batch-size 104 --grad-accum 4   # the paper's batch on 8 GPUs
    python bfn_text8.py --sample-only --sampler sde --sample-steps 100 --num-samples 200
    python bfn_text8.py --preset quick --vocab 1024 --text-file book.txt      # K = 1024 subword tokens

Sampling a trained model beyond the paper (prompts, infilling, guidance) is in beyond/, one command per feature.
Shapes: B batch, L sequence length (--seq-len), K symbols (27 for text8; --vocab), W transformer width.
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import resource
import shlex
import shutil
import signal
import sys
import time
import types
import zipfile
import zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP

import common

SCRIPT = "bfn_text8.py"
UNIT = "bits/char"
ADAMW_BETAS = (0.9, 0.98)
TIME_DRAWS = ("uniform", "stratified")  # of t in a training batch: the paper's, or one t per stratum (beyond)
ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # text8's symbols: symbol k is ALPHABET[k]


def error(message):
    """The exception that stops the script with one line: "SCRIPT: error: message" (exit status 1)."""
    return SystemExit(f"{SCRIPT}: error: {message}")


def setting(default, help=None, choices=None, low=None, fixed=False):
    """A Config field: default, --help (None: presets only), choices, bound (int >= low, float > low), fixed (kept)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "low": low, "fixed": fixed})


@dataclasses.dataclass
class Config:
    """Every setting of a run; each with help is a flag (--batch-size for batch_size). The defaults are the paper's."""

    data_dir: str = setting("data", "where text8.zip is, or is downloaded to")
    text_file: str = setting("", "train on this UTF-8 text file instead of text8")
    seq_len: int = setting(256, "characters (with --vocab: tokens) per window", low=1, fixed=True)
    vocab: int = setting(0, "K subword tokens, byte-pair merges of the characters (0: characters)", low=0, fixed=True)
    beta_1: float = setting(None, "final accuracy of beta(t) = beta(1) t^2 (§6.8) (default: K's)", low=0.0, fixed=True)
    layers: int = setting(24, "transformer layers", low=1, fixed=True)
    heads: int = setting(12, "attention heads", low=1, fixed=True)
    width: int = setting(768, "transformer width (a multiple of 2 x --heads)", low=2, fixed=True)
    steps: int = setting(100_000, "optimiser steps to train (the total, also when resuming)", low=1)
    batch_size: int = setting(128, "windows per process and step, also of evaluation and sampling", low=1)
    grad_accum: int = setting(1, "batches accumulated per optimiser step", low=1)
    lr: float = setting(1e-4, "AdamW learning rate", low=0.0)
    t_draw: str = setting("uniform", "t of a training batch: each alone, or one per 1/B of [0, 1]", TIME_DRAWS)
    eval_n: tuple = setting(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = setting(0, "evaluate on N test windows drawn with a fixed seed (0: all)", low=0)
    eval_repeats: int = setting(1, "passes over them with fresh noise", low=1)
    sampler: str = setting("paper", "Algorithm 9, or the second-order ODE or SDE solver", ("paper", "ode", "sde"))
    sample_steps: int = setting(1000, "generation steps n", low=1)
    num_samples: int = setting(8, "windows to sample", low=1)
    preset: str = setting("paper", "the paper's settings, or a small CPU recipe; flags given win", ("paper", "quick"))
    out_dir: str = setting("runs/bfn_text8", "the run directory")
    resume: bool = setting(False, "continue from <out-dir>/ckpt.pt with its settings (flags given change them)")
    init_from: str = setting("", "start from the weights of another run's ckpt.pt or an authors' checkpoint")
    eval_only: bool = setting(False, "evaluate the checkpoint in <out-dir> on the test set")
    sample_only: bool = setting(False, "sample from the checkpoint in <out-dir>")
    seed: int = setting(0, "everything random derives from it")
    device: str = setting("auto", "auto (cuda, mps or cpu), cpu, cuda (this process's GPU), cuda:N or mps")
    compile: bool = setting(False, "torch.compile the network for training")
    log_every: int = setting(100, "steps between log lines", low=1)
    alphabet: str = setting("", fixed=True)  # the characters in order: text8's, or the --text-file's own
    merges: tuple = setting((), fixed=True)  # --vocab: token len(alphabet) + i is the pair merges[i] of tokens (a, b)
    chars: float = setting(1.0, fixed=True)  # characters per symbol of the training split (for the training log)
    lr_warmup: int = setting(0)  # steps of linear learning-rate warm-up (the paper: none)
    lr_decay: str = setting("none")  # "cosine": down to 0.1 --lr at --steps (the paper: constant)

    def __post_init__(self):  # what the flags leave open: the alphabet, --vocab's merges, beta(1)
        if not self.alphabet:  # the text's own characters, or text8's when it has no others
            own = "".join(sorted(set(read_text(self.text_file)))) if self.text_file else ALPHABET
            self.alphabet = ALPHABET if set(own) <= set(ALPHABET) else own
        if self.vocab > len(self.alphabet) and not self.merges:
            self.merges, self.chars = learn_tokens(self)
        if self.beta_1 is None:  # K beta(1): the true symbol's lead in y at t = 1 (§6.3); beyond the paper for K != 27
            K = len(self.alphabet) + len(self.merges)  # characters: 0.5625 as text8, K beta(1) >= 15.19 (K = 2: 7.6)
            self.beta_1 = 20.4054 / K if self.vocab else max(0.5625, 0.5625 * 27 / K)  # tokens: 20.4 / K, ChemBFN's


QUICK_NETWORK = {"layers": 4, "heads": 4, "width": 128, "seq_len": 32}
QUICK_TRAINING = {"batch_size": 16, "lr": 1e-3, "steps": 17904}
QUICK_OUTPUTS = {"eval_examples": 1000, "num_samples": 4, "sample_steps": 100}
PRESETS = {"paper": {}, "quick": QUICK_NETWORK | QUICK_TRAINING | QUICK_OUTPUTS}


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
    if len(set(cfg.alphabet)) != len(cfg.alphabet) or not 2 <= len(cfg.alphabet) <= 4096:
        raise error(f"the alphabet needs 2 to 4096 different symbols, got {len(cfg.alphabet)}")
    if cfg.vocab and cfg.vocab <= len(cfg.alphabet):
        raise error(f"--vocab must exceed the {len(cfg.alphabet)} characters of the alphabet, got {cfg.vocab}")
    if cfg.width % (2 * cfg.heads):
        raise error(f"--width must be a multiple of 2 x --heads, got width {cfg.width} and heads {cfg.heads}")


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
# Data: text8 (or any UTF-8 text) as one tensor of symbols on the device; batches are random windows.

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_BYTES = 31_344_016
TEXT8_BYTES = 100_000_000
TEXT8_CRC32 = 0x7D6BE66F


def load_text8(data_dir):
    """text8's 100,000,000 characters: data_dir/text8.zip, downloaded if missing, checked by size and CRC-32."""
    path = os.path.join(data_dir, "text8.zip")
    if not os.path.exists(path):
        if data_dir != Config.data_dir and not os.path.isdir(data_dir):
            raise error(f"--data-dir {data_dir} does not exist")
        made = not os.path.exists(data_dir)
        try:
            from torchvision.datasets.utils import download_url

            download_url(TEXT8_URL, data_dir, "text8.zip.part")
            os.replace(path + ".part", path)
        except Exception as failure:
            with contextlib.suppress(OSError):
                os.remove(path + ".part")
            if made:
                shutil.rmtree(data_dir, ignore_errors=True)
            fix = f"Put text8.zip into {data_dir}/ by hand, or train on any text with --text-file FILE"
            raise error(f"downloading {TEXT8_URL} (31 MB) failed ({type(failure).__name__}). {fix}") from None
    fix = f"Delete {path} to download it afresh"
    if os.path.getsize(path) != TEXT8_ZIP_BYTES:
        raise error(f"{path} is {os.path.getsize(path):,} bytes, not {TEXT8_ZIP_BYTES:,}: truncated or corrupt. {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read("text8")  # zipfile checks the member's CRC-32 as it reads
    except (zipfile.BadZipFile, zlib.error, KeyError, OSError, EOFError) as failure:
        raise error(f"{path} is not a valid text8 archive ({failure}). {fix}") from None
    if len(raw) != TEXT8_BYTES or zlib.crc32(raw) != TEXT8_CRC32:
        found = f"{len(raw):,} bytes with CRC-32 {zlib.crc32(raw):#010x}"
        raise error(f"the text8 in {path} is {found}, not {TEXT8_BYTES:,} with {TEXT8_CRC32:#010x}. {fix}")
    return raw.decode("ascii")


def read_text(path):
    """A UTF-8 text file as str, without one final newline."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise error(f"--text-file {path} does not exist") from None
    except UnicodeDecodeError as failure:
        raise error(f"--text-file {path} is not UTF-8 text (byte {failure.start:,}: {failure.reason})") from None
    if not text.strip():
        raise error(f"--text-file {path} is empty")
    return text.removesuffix("\n")


def encode(text, alphabet, source):
    """text -> (N,) symbols, symbol k being alphabet[k] (uint8; int16 beyond 256 symbols)."""
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    table = torch.full((max(max(map(ord, alphabet)), codes.max().item()) + 1,), -1)  # code point -> symbol
    table[[ord(c) for c in alphabet]] = torch.arange(len(alphabet))
    x = table[codes]
    if (x < 0).any():
        at = (x < 0).nonzero()[0].item()
        raise error(f"{source} has the character {text[at]!r} at position {at:,}, not in the alphabet {alphabet!r}")
    return x.to(torch.uint8 if len(alphabet) <= 256 else torch.int16)


def load_data(cfg, device):
    """{train, val, test}: (N,) symbols on the device, the text's first 90%, next 5%, last 5%."""
    text = read_text(cfg.text_file) if cfg.text_file else load_text8(cfg.data_dir)
    x = encode(text, cfg.alphabet, cfg.text_file or "text8")  # also: every character is in the alphabet
    a = len(text) * 90 // 100
    b = len(text) * 95 // 100
    data = {"train": x[:a], "val": x[a:b], "test": x[b:]}
    if cfg.vocab:
        data = {"train": text[:a], "val": text[a:b], "test": text[b:]}
        data = {split: tokenize(part, cfg.alphabet, cfg.merges) for split, part in data.items()}
    if len(data["test"]) < cfg.seq_len:
        raise error(f"the text ({len(text):,} characters) is too short: its last 5% holds no --seq-len {cfg.seq_len}")
    return {split: part.to(device) for split, part in data.items()}


def get_batch(data, cfg):
    """Random training windows (B, L) of symbols (long), and None (no labels)."""
    start = torch.randint(len(data["train"]) - cfg.seq_len + 1, (cfg.batch_size, 1), device=data["train"].device)
    return data["train"][start + torch.arange(cfg.seq_len, device=start.device)].long(), None


def test_windows(cfg, data):
    """The test split cut into windows (N, L); --eval-examples of them drawn with a fixed seed (all if 0)."""
    windows = data["test"][: len(data["test"]) // cfg.seq_len * cfg.seq_len].view(-1, cfg.seq_len)
    if cfg.eval_examples and cfg.eval_examples < len(windows):
        keep = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))[: cfg.eval_examples]
        windows = windows[keep.sort().values.to(windows.device)]
    return windows


def in_paper_unit(nats, cfg):
    """Nats per window -> bits per character (with --vocab over the training split's characters per token)."""
    return nats / (cfg.seq_len * cfg.chars * math.log(2))


def decode(x, symbols):
    """(L,) symbols -> str: symbol k is the string symbols[k]."""
    return "".join(symbols[k] for k in x.tolist())


# ----------------------------------------------------------------------------------------------------------------------
# Subword tokens (--vocab, beyond the paper): byte-pair encoding (Sennrich et al., 2016) of the characters. Token k is
# the string symbols(cfg)[k]: the characters first, then each merge's pair joined, so decoding is exact.


def words(text):
    """text -> its words, each with the space before it ("a  cat" -> "a", " ", " cat"); tokens never cross them."""
    parts = text.split(" ")
    return [parts[0]] + [" " + word for word in parts[1:]]


def merge(tokens, pair, new):
    """Every non-overlapping occurrence of pair (a, b) in the list tokens, left to right, replaced by new."""
    out = []
    for token in tokens:
        if out and (out[-1], token) == pair:  # out[-1] is never a new token here: new is not a
            out[-1] = new
        else:
            out.append(token)
    return out


def learn_merges(text, alphabet, n):
    """n byte-pair merges of text: the commonest pair of adjacent tokens in a word becomes token len(alphabet) + i."""
    counts = collections.Counter(words(text))
    seqs = [[alphabet.index(c) for c in word] for word in counts]
    freq = list(counts.values())
    pairs = collections.Counter()  # pair -> its count
    where = collections.defaultdict(set)  # pair -> the words that hold it
    for w, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += freq[w]
            where[pair].add(w)
    merges = []
    for new in range(len(alphabet), len(alphabet) + n):
        best = max(pairs, key=pairs.get, default=None)
        if best is None or pairs[best] < 1:
            raise error(f"the training text has nothing left to merge at {new} tokens: --vocab at most {new}")
        merges.append(best)
        for w in where.pop(best):  # only the words that hold the pair change
            for pair in zip(seqs[w], seqs[w][1:]):
                pairs[pair] -= freq[w]
            seqs[w] = merge(seqs[w], best, new)
            for pair in zip(seqs[w], seqs[w][1:]):
                pairs[pair] += freq[w]
                where[pair].add(w)
        del pairs[best]
    return tuple(merges)


def learn_tokens(cfg):
    """--vocab K: (K - len(alphabet) merges, characters per token) of the training split (the first 90%)."""
    text = read_text(cfg.text_file) if cfg.text_file else load_text8(cfg.data_dir)
    train = text[: len(text) * 90 // 100]
    merges = learn_merges(train, cfg.alphabet, cfg.vocab - len(cfg.alphabet))
    return merges, len(train) / len(tokenize(train, cfg.alphabet, merges))


def symbols(cfg):
    """The K symbols of the run as strings: the characters, then each merge's two tokens joined."""
    strings = list(cfg.alphabet)
    for a, b in cfg.merges:
        strings.append(strings[a] + strings[b])
    return strings


def tokenize(text, alphabet, merges):
    """text -> (N,) symbols (int32): each word's characters, then the merges applied in the order learnt."""
    rank = {pair: i for i, pair in enumerate(merges)}
    cache = {}
    out = []
    for word in words(text):
        if word not in cache:
            tokens = [alphabet.index(c) for c in word]
            while len(tokens) > 1:
                pair = min(zip(tokens, tokens[1:]), key=lambda p: rank.get(p, math.inf))  # the earliest merge
                if pair not in rank:
                    break
                tokens = merge(tokens, pair, len(alphabet) + rank[pair])
            cache[word] = tokens
        out += cache[word]
    return torch.tensor(out, dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------------------
# Network: the authors' non-causal transformer for text8 (pre-LN, tanh-GELU), tensor for tensor: their parameter names
# (inside `net.`, see from_authors), shapes and function; attention through scaled_dot_product_attention.


def positions(seq_len, width):
    """Fixed sinusoidal features (the authors': base 1000), sin(l / 1000^(j / W)) at even j, cos at odd j. -> (L, W)."""
    position = torch.arange(seq_len, dtype=torch.float32)[:, None]  # (L, 1)
    j = torch.arange(width, dtype=torch.float32)
    args = position / 1000 ** (j / width)  # (L, W)
    return torch.where(j % 2 == 0, args.sin(), args.cos())


class Block(nn.Module):
    """Pre-LayerNorm: self-attention over all positions (non-causal), then a tanh-GELU MLP, each added to its input."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.attn = nn.ModuleDict({"c_attn": nn.Linear(width, 3 * width), "c_proj": nn.Linear(width, width)})
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)})

    def forward(self, x):  # (B, L, W) -> (B, L, W)
        qkv = rearrange(self.attn.c_attn(self.ln_1(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q, k, v = qkv.contiguous()  # contiguous: fast on CPU
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, W / heads)
        x = x + self.attn.c_proj(rearrange(h, "b h l d -> b l (h d)"))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class Transformer(nn.Module):
    """Psi(theta, t): 2 theta - 1 (B, L, K), t (B,) -> logits (B, L, K), from the last LayerNorm and the embedding."""

    def __init__(self, seq_len=256, layers=24, heads=12, width=768, K=27):
        super().__init__()
        self.inp_embedding = nn.Linear(K, width)
        self.t_embedding = nn.Linear(1, width)
        self.register_buffer("pos_embedding", positions(seq_len, width), persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(2 * width, K)
        # GPT-2's initialisation, as the authors': weights N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 layers))
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x, t, y=None):  # (B, L, K), (B,) -> (B, L, K); y: no labels here
        t = (2 * t - 1)[:, None, None]  # (B, 1, 1)
        x = self.inp_embedding(x) + self.pos_embedding[: x.shape[1]] + self.t_embedding(t)  # (B, L, W)
        h = x
        for block in self.blocks:
            h = block(h)
        return self.lm_head(torch.cat([self.ln_f(h), x], -1))


def make_network(cfg):
    """The transformer of the settings, for K = len(symbols(cfg)) symbols."""
    return Transformer(cfg.seq_len, cfg.layers, cfg.heads, cfg.width, len(symbols(cfg)))


def from_authors(state):
    """A state_dict of the authors' BFN module (`net.` + their names) -> this network's (positions recomputed)."""
    ours = {}
    for name, tensor in state.items():
        name = name.removeprefix("net.").removeprefix("input_adapter.").removeprefix("transformer.")
        if name.startswith("h."):  # their blocks h.N are our blocks.N
            name = "blocks." + name.removeprefix("h.")
        if name != "pos_embedding":
            ours[name] = tensor
    return ours


# ----------------------------------------------------------------------------------------------------------------------
# BFN: the network as the output distribution of discrete data (§6.4), the loss, the test bound and the samplers.


def output_log_probs(net, theta, t, runtime):
    """ln p_O(k | theta, t), a log-softmax over the K logits in float32: theta (B, L, K), t (B,) -> (B, L, K)."""
    with runtime.autocast:
        logits = net(2 * theta - 1, t)  # (B, L, K)
    return torch.log_softmax(logits.float(), -1)


def train_loss(net, batch, cfg, runtime):
    """L^inf (§6.7, Algorithm 8) of a batch (x (B, L), None): t ~ U(0, 1), theta ~ p_F(. | x; t). (B,) nats/window."""
    x, _ = batch
    t = common.training_times(len(x), cfg.t_draw == "stratified", device=x.device)
    theta = common.discrete_flow(x, t, cfg.beta_1, len(cfg.alphabet) + len(cfg.merges))  # K, not hashing symbols()
    return common.discrete_loss_inf(x, output_log_probs(net, theta, t, runtime).exp(), t, cfg.beta_1)


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
    """The test bound -ln p(x) <= L^n + L^r (§6.6, §6.9; inf: L^inf, §6.7) for each --eval-n on --eval-examples test
    windows, --eval-repeats passes with fresh noise, the steps i of L^n stratified: in eval.json and the log."""
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    windows = test_windows(cfg, data)
    K = len(symbols(cfg))

    def log_probs(x, t):  # ln p_O at theta ~ p_F(. | x; t)
        return output_log_probs(net, common.discrete_flow(x, t, cfg.beta_1, K, generator), t, runtime)

    losses = {n: [] for n in cfg.eval_n}
    recon = []
    for _ in range(cfg.eval_repeats):
        for start in range(0, len(windows), cfg.batch_size):
            x = windows[start : start + cfg.batch_size].long()
            recon.append(common.discrete_recon_loss(x, log_probs(x, torch.ones(len(x), device=x.device))))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(len(x), generator=generator, device=x.device)
                    losses[n].append(common.discrete_loss_inf(x, log_probs(x, t).exp(), t, cfg.beta_1))
                else:
                    i = common.stratified_steps(int(n), len(x), generator, x.device)  # every step as often
                    t = (i - 1) / int(n)
                    losses[n].append(common.discrete_loss_n(x, log_probs(x, t), i, int(n), cfg.beta_1, generator))
    lengths = torch.tensor([len(s) for s in symbols(cfg)], device=windows.device)
    chars = lengths[windows.long()].sum(1).double()  # (N,) characters of each window
    return write_eval(losses, recon, chars, cfg, runtime, step)


def write_eval(losses, recon, chars, cfg, runtime, step):
    """Losses in nats ({n: [(B,), ...]}, [(B,), ...], pass after pass) and characters (N,) per window -> bits/char: all
    windows' bits over their characters, the ratio's standard error over windows; --vocab: bits/token too."""
    recon = torch.cat(recon).double().view(cfg.eval_repeats, -1).mean(0) / math.log(2)  # (N,) bits
    result = {}
    for n, parts in losses.items():
        total = torch.cat(parts).double().view(cfg.eval_repeats, -1).mean(0) / math.log(2) + recon  # (N,) bits
        ratio = total.sum().item() / chars.sum().item()
        spread = (total - ratio * chars).std() / chars.mean()  # of each window's bits about the ratio, per character
        stderr = spread.item() / math.sqrt(len(total))
        loss = (total - recon).sum().item() / chars.sum().item()
        result[n] = {"loss": loss, "recon": recon.sum().item() / chars.sum().item(), "total": ratio, "stderr": stderr}
        if cfg.vocab:
            result[n]["bits_per_token"] = total.mean().item() / cfg.seq_len  # the bound per token of a window
    report = {"step": step, "split": "test", "unit": UNIT, "examples": len(recon), "repeats": cfg.eval_repeats}
    report["n"] = result
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=1)
    bounds = [f"L^{n}+L^r {r['total']:.4g} ± {r['stderr']:.2g} (L^r {r['recon']:.3g})" for n, r in result.items()]
    runtime.log(f"test bound at step {step}: {' | '.join(bounds)} {UNIT} | eval.json")
    return report


SAMPLERS = {"paper": common.discrete_sample, "ode": common.discrete_sample_ode, "sde": common.discrete_sample_sde}


def prediction(net, cfg, runtime, labels=None):
    """The network as the samplers take it, (theta, t) -> p_O(. | theta, t); labels: none here."""

    def probs(theta, t):
        return output_log_probs(net, theta, t, runtime).exp()

    return probs


@torch.no_grad()
def generate(predict, n, cfg, runtime, generator):
    """n windows (n, L) from the --sampler at --sample-steps; predict(theta, t) -> p_O, as from prediction()."""
    sampler = SAMPLERS[cfg.sampler]
    shape = (n, cfg.seq_len)
    K = len(symbols(cfg))
    return sampler(predict, shape, cfg.sample_steps, cfg.beta_1, K, generator=generator, device=runtime.device)


# ----------------------------------------------------------------------------------------------------------------------
# Figures: samples as text and as an animation, and the samples themselves for benchmarks/score_samples.py.


def recording(predict, trajectory, rows=3):
    """predict, appending at each call t and the likeliest symbols under theta and p_O (first `rows`) to trajectory."""

    def call(theta, t):
        probs = predict(theta, t)
        trajectory.append({"t": t[0].item(), "input": theta[:rows].argmax(-1), "output": probs[:rows].argmax(-1)})
        return probs

    return call


def save_samples(x, texts, cfg, name):
    """Samples (N, L) and their text, with the run's settings, for benchmarks/score_samples.py."""
    saved = {"samples": x.cpu(), "texts": texts, "script": SCRIPT, "config": dataclasses.asdict(cfg)}
    torch.save(saved, os.path.join(cfg.out_dir, name))


def save_text_gif(frames, path, max_frames=100):
    """An animated GIF of frames (each a list of lines), at most max_frames evenly spaced, the last held."""
    if len(frames) > max_frames:
        frames = [frames[round(k * (len(frames) - 1) / (max_frames - 1))] for k in range(max_frames)]
    texts = ["\n".join(lines) for lines in frames]
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), max(texts, key=len))
    images = []
    for text in texts:
        image = Image.new("L", (right + 8, bottom + 8), 255)
        ImageDraw.Draw(image).multiline_text((4, 4), text, fill=0)
        images.append(image)
    durations = [80] * (len(images) - 1) + [2000]  # milliseconds per frame; the samples held at the end
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


@torch.no_grad()
def write_samples(net, cfg, runtime):
    """samples.txt and samples-SAMPLER-STEPS.pt; evolution.txt and .gif: the likeliest symbols under theta and p_O."""
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    trajectory = []
    batches = []
    for index in torch.arange(cfg.num_samples).split(cfg.batch_size):
        predict = prediction(net, cfg, runtime)
        if index[0] == 0:
            predict = recording(predict, trajectory)
        batches.append(generate(predict, len(index), cfg, runtime, generator))
    x = torch.cat(batches)
    texts = [decode(row, symbols(cfg)) for row in x]
    name = f"samples-{cfg.sampler}-{cfg.sample_steps}.pt"
    save_samples(x, texts, cfg, name)
    header = f"({cfg.sample_steps} steps, {cfg.sampler})"
    with open(os.path.join(cfg.out_dir, "samples.txt"), "w") as f:
        f.writelines(f"--- sample {b} {header}\n{text}\n" for b, text in enumerate(texts))
    shown = [symbol.replace("\n", "¶") for symbol in symbols(cfg)]  # each sample on one line
    frames = []  # a frame per network call, then the samples: the likeliest symbols of 3 samples under theta and p_O
    calls = trajectory + [{"t": 1.0, "input": x, "output": x}]
    for call in calls:
        frames.append([f"t = {call['t']:.3f}"])
        for b in range(min(3, len(x))):
            theta_text, output_text = decode(call["input"][b], shown), decode(call["output"][b], shown)
            frames[-1] += [f"input  |{theta_text}|", f"output |{output_text}|", ""]
    save_text_gif(frames, os.path.join(cfg.out_dir, "evolution.gif"))
    tenths = [min(range(len(calls)), key=lambda k: abs(calls[k]["t"] - j / 10)) for j in range(11)]
    with open(os.path.join(cfg.out_dir, "evolution.txt"), "w") as f:  # the frames at t = 0, 0.1, ..., 1
        f.writelines("\n".join(frames[k]) + "\n" for k in tenths)
    runtime.log(f"samples ({cfg.sampler}, {cfg.sample_steps} steps): samples.txt, {name}, evolution.txt, evolution.gif")


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
