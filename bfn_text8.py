"""Bayesian Flow Network on text8 characters (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 27.

Trains the authors' non-causal transformer with the continuous-time loss L^inf (Algorithm 8), evaluates the test bound
L^inf + L^r and L^n + L^r in bits/char (the paper: 1.41), and samples with Algorithm 9 or the ODE or SDE solver of
common.py. --text-file trains on any UTF-8 text, its alphabet its own characters, beta(1) by common.discrete_beta_1.
Writes log.txt, ckpt.pt, eval.json, samples.txt and evolution.txt/.gif (theta and p_O over time) to --out-dir.

    python bfn_text8.py --preset quick --text-file book.txt   # a small transformer on any text, minutes on a CPU
    python bfn_text8.py --steps 1000                          # the paper's model and optimiser (text8 downloaded)
    torchrun --nproc_per_node=8 bfn_text8.py --batch-size 104 --grad-accum 4   # the paper's batch on 8 GPUs
    python bfn_text8.py --sample-only --sampler ode sde --sample-steps 10 100 --eval-samples 200   # scored
    python bfn_text8.py --sample-only --infill "the ____ of the united states" --particles 8
    python bfn_text8.py --sample-only --guide-word zero --grad-guidance 3     # steer any model towards a word

Shapes: B batch, L sequence length (--seq-len), K symbols (27 for text8), W transformer width.
"""
import argparse, contextlib, copy, ctypes, dataclasses, datetime, itertools, json, math, os, resource, shlex, shutil
import signal, subprocess, sys, threading, time, zipfile, zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import discrete_beta_1, discrete_flow, discrete_guided_probs, discrete_loss_inf, discrete_loss_n, \
    discrete_recon_loss, discrete_sample, discrete_sample_ode, discrete_sample_sde, stratified_steps

SCRIPT, UNIT = "bfn_text8.py", "bits/char"


def opt(default, help, fixed=False, **accepts):
    """A setting: default, --help, whether it fixes the model or the data (a checkpoint keeps it), and the values it
    accepts (choices=(...), low: at least, high: below)."""
    return dataclasses.field(default=default, metadata={"help": help, "fixed": fixed, **accepts})


@dataclasses.dataclass
class Config:
    """Every setting of a run, each a flag (--batch-size for batch_size); the defaults are the paper's."""
    data_dir: str = opt("data", "where text8.zip is, or is downloaded to")
    text_file: str = opt("", "train on this UTF-8 text file instead of text8")
    alphabet: str = opt("", "the K symbols in order (default: text8's, or the --text-file's own characters)", True)
    seq_len: int = opt(256, "characters per window", True, low=1)
    beta_1: float = opt(0.0, "final accuracy beta(1) of beta(t) = beta(1) t^2 (§6.8); 0: 0.5625 for K >= 27, larger "
                             "below (discrete_beta_1)", True, low=0)
    layers: int = opt(24, "transformer layers", True, low=1)
    heads: int = opt(12, "attention heads", True, low=1)
    width: int = opt(768, "transformer width (a multiple of 2 x --heads)", True, low=1)
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)", low=0)
    batch_size: int = opt(128, "windows per process and step (global: x --grad-accum x processes)", low=1)
    grad_accum: int = opt(1, "batches accumulated per optimiser step", low=1)
    lr: float = opt(1e-4, "AdamW learning rate (the peak, with a schedule)", low=1e-12)
    lr_warmup: int = opt(0, "steps of linear learning-rate warm-up (0: the paper's)", low=0)
    lr_decay: str = opt("none", "decay to --lr-final x --lr at --steps", choices=("none", "cosine", "linear"))
    lr_final: float = opt(0.1, "with --lr-decay: the final learning rate as a fraction of --lr", low=0, high=1)
    betas: tuple = opt((0.9, 0.98), "AdamW betas", low=0, high=1)
    weight_decay: float = opt(0.01, "AdamW weight decay (weights of linear layers)", low=0)
    grad_clip: float = opt(5.0, "clip the gradient norm to this", low=1e-12)
    ema_decay: float = opt(0.9999, "EMA decay of the weights that evaluate and sample (warmed up)", low=0, high=1)
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = opt(0, "evaluate on N test windows drawn with a fixed seed (0: all)", low=0)
    eval_repeats: int = opt(1, "passes over them with fresh noise", low=1)
    eval_batch_size: int = opt(256, "windows per evaluation and sampling batch", low=1)
    sampler: tuple = opt(("paper",), "Algorithm 9, or the second-order ODE or SDE solver; several: each",
                         choices=("paper", "ode", "sde"))
    sample_steps: tuple = opt((1000,), "generation steps n; several: each", low=1)
    num_samples: int = opt(8, "samples in samples.txt, and completions of --prompt or --infill", low=1)
    final: str = opt("sample", "the result at t = 1: a draw of p_O (the paper's) or its mode",
                     choices=("sample", "mode"))
    eval_samples: int = opt(0, "sample quality of N samples and N test windows: real words, 5-gram bits/char", low=0)
    prompt: str = opt("", "sample continuations of this text (of the alphabet), fixed at the start of every window")
    infill: str = opt("", "fill in the underscores of this text, fixed at the start of every window")
    particles: int = opt(1, "with --prompt, --infill: sequential Monte Carlo over P particles (1: replacement)", low=1)
    guide_word: str = opt("", "with --grad-guidance: steer samples towards containing this word")
    grad_guidance: tuple = opt((0.0,), "guidance weight towards --guide-word, through the network; several: each",
                               low=0)
    preset: str = opt("paper", "the paper's settings, or a small CPU recipe; flags given win",
                      choices=("paper", "quick"))
    out_dir: str = opt("runs/bfn_text8", "the run directory")
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


PRESETS = {"paper": {}, "quick": dict(layers=4, heads=4, width=128, seq_len=32, batch_size=16, lr=1e-3, steps=17904,
                                      eval_every=0, sample_every=0, eval_examples=1000, num_samples=4,
                                      sample_steps=(100,))}


def check(cfg):
    """The settings that depend on each other -> (cfg, with the alphabet and beta(1) resolved; the problems, each a
    one-line message)."""
    if not cfg.alphabet:  # the text's own characters, or text8's when it has no others
        alphabet = "".join(sorted(set(read_text(cfg.text_file)))) if cfg.text_file else ALPHABET
        cfg = dataclasses.replace(cfg, alphabet=ALPHABET if set(alphabet) <= set(ALPHABET) else alphabet)
    if cfg.beta_1 == 0:
        cfg = dataclasses.replace(cfg, beta_1=discrete_beta_1(len(cfg.alphabet)))
    text, outside = cfg.prompt or cfg.infill or cfg.guide_word, set(cfg.prompt + cfg.guide_word + cfg.infill.replace(
        "_", "")) - set(cfg.alphabet)
    return cfg, [message for bad, message in [
        (len(set(cfg.alphabet)) != len(cfg.alphabet) or not 2 <= len(cfg.alphabet) <= 4096,
         f"--alphabet needs 2 to 4096 different symbols, got {len(cfg.alphabet)} ({len(set(cfg.alphabet))} different)"),
        (cfg.width % cfg.heads != 0 or cfg.width // cfg.heads % 2 != 0,
         f"--width must be a multiple of 2 x --heads, got width {cfg.width} and heads {cfg.heads}"),
        (any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n),
         f"--eval-n takes inf or positive integers, got {' '.join(cfg.eval_n)}"),
        (cfg.eval_samples == 1 or len(cfg.betas) != 2, "--eval-samples must be 0 or >= 2; --betas takes two numbers"),
        (bool(cfg.prompt) and bool(cfg.infill), "--prompt and --infill exclude each other"),
        (bool(outside), f"--prompt, --infill and --guide-word take the symbols of the alphabet {cfg.alphabet!r}; "
                        f"{''.join(sorted(outside))!r} {'is' if len(outside) == 1 else 'are'} not in it"),
        (bool(cfg.infill) and "_" not in cfg.infill, "--infill needs at least one _ to fill in"),
        (len(text) > cfg.seq_len, f"--prompt, --infill or --guide-word is longer than --seq-len {cfg.seq_len}"),
        (any(cfg.grad_guidance) != bool(cfg.guide_word), "--grad-guidance and --guide-word go together"),
        (cfg.particles > 1 and not (cfg.prompt or cfg.infill), "--particles is for --prompt and --infill"),
        (cfg.particles > 1 and "ode" in cfg.sampler, "--particles needs a stochastic sampler (paper, sde): the ODE "
         "solver is deterministic after its first draw, so there is nothing to reweight"),
        (cfg.eval_only and cfg.sample_only, "--eval-only and --sample-only exclude each other"),
        (cfg.resume and bool(cfg.init_from), "--resume and --init-from exclude each other")] if bad]


# ----------------------------------------------------------------------------------------------------------------------
# Data: text8 (or any UTF-8 text) as one tensor of symbols on the device; batches are random windows.

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
TEXT8_ZIP_BYTES, TEXT8_BYTES, TEXT8_CRC32 = 31_344_016, 100_000_000, 0x7D6BE66F
ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # text8's symbols: symbol k is ALPHABET[k]


def load_text8(data_dir):
    """The 100,000,000 characters of text8 as bytes: data_dir/text8.zip, downloaded (streamed, with a progress line)
    if missing, then checked (size and CRC-32). A failed download leaves nothing behind."""
    path = os.path.join(data_dir, "text8.zip")
    if not os.path.exists(path):
        if data_dir != Config.data_dir and not os.path.isdir(data_dir):
            raise SystemExit(f"{SCRIPT}: error: --data-dir {data_dir} does not exist")
        made = not os.path.exists(data_dir)
        try:
            import requests
            os.makedirs(data_dir, exist_ok=True)
            with requests.get(TEXT8_URL, stream=True, timeout=60) as r, open(path + ".part", "wb") as f:
                r.raise_for_status()
                for k, chunk in enumerate(r.iter_content(1 << 20)):
                    f.write(chunk)
                    print(f"\rdownloading {TEXT8_URL}: {k + 1} / {TEXT8_ZIP_BYTES >> 20} MB", end="", file=sys.stderr)
            os.replace(path + ".part", path)
        except Exception as e:
            with contextlib.suppress(OSError):
                os.remove(path + ".part")
            if made:
                shutil.rmtree(data_dir, ignore_errors=True)
            raise SystemExit(f"{SCRIPT}: error: downloading {TEXT8_URL} (31 MB) failed ({type(e).__name__}). Put "
                             f"text8.zip into {data_dir}/ by hand, or train on any text with --text-file FILE")
    fix = f"Delete {path} to download it afresh."
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
    if not text.strip():
        raise SystemExit(f"{SCRIPT}: error: --text-file {path} is empty")
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
    if len(bad := (x < 0).nonzero()):
        raise SystemExit(f"{SCRIPT}: error: {source} has the character {chr(codes[bad[0].item()])!r} at position "
                         f"{bad[0].item():,}, which is not in the alphabet {alphabet!r}")
    return x.to(torch.uint8 if len(alphabet) <= 256 else torch.int16)


def load_data(cfg, device):
    """{train, val, test}: (N,) symbols on the device; the first 90%, the next 5%, the last 5%."""
    if cfg.text_file:
        text = read_text(cfg.text_file)
        x = encode(text.encode() if cfg.alphabet == ALPHABET and text.isascii() else text, cfg.alphabet, cfg.text_file)
    else:
        x = encode(load_text8(cfg.data_dir), cfg.alphabet, "text8")
    a, b = len(x) * 90 // 100, len(x) * 95 // 100
    if len(x) - b < cfg.seq_len:
        raise SystemExit(f"{SCRIPT}: error: the text is too short ({len(x):,} characters) for 5% of it to hold a "
                         f"window of --seq-len {cfg.seq_len}")
    return {"train": x[:a].to(device), "val": x[a:b].to(device), "test": x[b:].to(device)}


def get_batch(data, cfg):
    """Random training windows (B, L) of symbols (long), and None (no labels)."""
    start = torch.randint(len(data["train"]) - cfg.seq_len + 1, (cfg.batch_size, 1), device=data["train"].device)
    return data["train"][start + torch.arange(cfg.seq_len, device=start.device)].long(), None


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


# ----------------------------------------------------------------------------------------------------------------------
# BFN: the network as the output distribution of discrete data (§6.4), the loss, the test bound and the draw.

def output_log_probs(net, theta, t, ctx):
    """ln p_O(k | theta, t), a log-softmax over the K logits in float32: theta (B, L, K), t (B,) -> (B, L, K)."""
    with ctx.autocast:
        logits = net(2 * theta - 1, t)  # (B, L, K)
    return torch.log_softmax(logits.float(), -1)


def train_loss(net, batch, cfg, ctx):
    """L^inf (§6.7, Algorithm 8) of a batch (x (B, L), None): t ~ U(0, 1), theta ~ p_F(. | x; t). (B,) nats/window."""
    x, _ = batch
    t = torch.rand(len(x), device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, len(cfg.alphabet))
    return discrete_loss_inf(x, output_log_probs(net, theta, t, ctx).exp(), t, cfg.beta_1)


@torch.no_grad()
def evaluate(net, windows, cfg, ctx, seed):
    """The test bound -ln p(x) <= L^n + L^r (§6.6, §6.9) for each n in --eval-n (inf: L^inf, §6.7), over
    --eval-repeats passes with fresh noise; the steps i of L^n stratified over the windows. windows (N, L) ->
    {n: {loss, recon, total, stderr}} in bits/char."""
    g = torch.Generator(windows.device).manual_seed(seed)
    K = len(cfg.alphabet)
    log_p = lambda x, t: output_log_probs(net, discrete_flow(x, t, cfg.beta_1, K, g), t, ctx)  # noqa: E731
    losses, recon = {n: [] for n in cfg.eval_n}, []
    progress = Progress("evaluating", cfg.eval_repeats * math.ceil(len(windows) / cfg.eval_batch_size))
    for _ in range(cfg.eval_repeats):
        steps = {n: stratified_steps(int(n), len(windows), g, windows.device) for n in cfg.eval_n if n != "inf"}
        for start in range(0, len(windows), cfg.eval_batch_size):
            progress.tick()
            x = windows[start:start + cfg.eval_batch_size].long()
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
def draw(net, n, cfg, ctx, generator, trajectory=False, known=None):
    """n samples (n, L) of the --sampler (Algorithm 9, or the ODE or SDE solver) at --sample-steps, in batches of
    --eval-batch-size; with trajectory, one batch, and its trajectory (theta and p_O at each network call). known
    (n, L): symbols to condition on, -1 where unknown (with --particles; common.py, Conditioning). With --guide-word,
    gradient guidance towards it."""
    sampler = {"paper": discrete_sample, "ode": discrete_sample_ode, "sde": discrete_sample_sde}[cfg.sampler]
    particles, word = cfg.particles if known is not None else 1, [cfg.alphabet.index(c) for c in cfg.guide_word]
    chunks = [torch.arange(n)] if trajectory else torch.arange(n).split(max(1, cfg.eval_batch_size // particles))
    progress = Progress(f"sampling ({cfg.sampler}, {cfg.sample_steps} steps)", len(chunks) * (cfg.sample_steps + 1))

    def run(idx):
        probs_fn = lambda theta, t: progress.tick() or guided_probs(net, theta, t, cfg, ctx, word)  # noqa: E731
        return sampler(probs_fn, (len(idx), cfg.seq_len), cfg.sample_steps, cfg.beta_1, len(cfg.alphabet),
                       generator=generator, device=ctx.device, return_trajectory=trajectory,
                       final_mode=cfg.final == "mode", known=None if known is None else known[idx],
                       **{"particles": particles} if particles > 1 else {})

    out = [run(idx) for idx in chunks]
    return out[0] if trajectory else torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# Beyond the paper: gradient guidance towards a word, prompts and infilling.

def guided_probs(net, theta, t, cfg, ctx, word=()):
    """p_O(. | theta, t) for sampling; with a --guide-word (word: its symbols) and w = --grad-guidance, gradient
    guidance p_O + w grad_y ln c(theta, t) (common.py, Guidance), c the probability under p_O, its positions taken as
    independent, that a window spells the word, summed over where it starts (log-sum-exp over positions). The
    gradient goes back through the network to theta: one backward pass per step."""
    if not word or not cfg.grad_guidance:
        return output_log_probs(net, theta, t, ctx).exp()
    with torch.enable_grad():
        th = theta.detach().requires_grad_()
        log_p = output_log_probs(net, th, t, ctx)  # (B, L, K)
        spelled = sum(log_p[:, j:log_p.shape[1] - len(word) + 1 + j, k] for j, k in enumerate(word))  # (B, L - m + 1)
        grad, = torch.autograd.grad(torch.logsumexp(spelled, -1).sum(), th)
    return discrete_guided_probs(log_p.detach().exp(), theta, grad, cfg.grad_guidance)


@torch.no_grad()
def complete(net, cfg, ctx, data, tag=""):
    """--prompt or --infill: --num-samples windows that start with the given text (its underscores, for --infill, left
    to the network, as is everything after it), given it by replacement or, with --particles, sequential Monte Carlo;
    in prompt.txt or infill.txt. For --infill the log gives how many filled-in words are words of the training text."""
    text, kind = cfg.prompt or cfg.infill, "prompt" if cfg.prompt else "infill"
    if not text:
        return
    known, start = torch.full((cfg.seq_len,), -1, dtype=torch.long), time.time()
    known[:len(text)] = torch.tensor([cfg.alphabet.index(c) if c != "_" or cfg.prompt else -1 for c in text])
    g, n = torch.Generator(ctx.device).manual_seed(cfg.seed + 2), cfg.num_samples
    samples = [decode(row, cfg.alphabet) for row in draw(net, n, cfg, ctx, g, known=known.to(ctx.device).expand(n, -1))]
    with open(os.path.join(cfg.out_dir, f"{kind}{tag}.txt"), "w") as f:
        f.write(f"{kind} |{text}| ({cfg.sampler} sampler, {cfg.sample_steps} steps, {cfg.particles} particles)\n" +
                "".join(f"--- {b}\n{s}\n" for b, s in enumerate(samples)))
    line = f"{kind} ({cfg.sampler}, {cfg.sample_steps} steps, {cfg.particles} particles, " \
           f"{time.time() - start:.0f} s): {n} completions"
    if cfg.infill:
        vocabulary = training_text_models(data["train"], cfg.alphabet)[0]
        filled = [filled_words(text, s) for s in samples]
        words = [w for ws in filled for w in ws]
        line += f"; the filled-in words are words of the training text for {sum(w in vocabulary for w in words)} of " \
                f"{len(words)}, e.g. {', '.join(filled[0][:5])}"
    ctx.log(line + f" | {kind}{tag}.txt")


def filled_words(pattern, text):
    """The words of text that overlap the underscores of pattern (text has the pattern's known characters)."""
    words, start = [], 0
    for word in text.split(" "):
        if word and "_" in pattern[start:start + len(word)]:
            words.append(word)
        start += len(word) + 1
    return words


# ----------------------------------------------------------------------------------------------------------------------
# Figures and sample quality: samples as text and as an animation; how many sampled words are real words of the
# training text, and how likely the samples are under a character 5-gram model of it.

def save_text_gif(frames, path, max_frames=100):
    """An animated GIF of text, at most max_frames frames evenly spaced (the last one kept, and held): frames, a list
    of lists of lines, drawn black on white in Pillow's default font, one character per fixed-width cell."""
    from PIL import Image, ImageDraw
    keep = sorted({round(k * (len(frames) - 1) / (max_frames - 1)) for k in range(max_frames)}) \
        if len(frames) > max_frames else list(range(len(frames)))
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    pitch = max(measure.textlength(c) for c in set("".join(frames[keep[-1]]) + "w"))  # a fixed advance per character
    width, height = 8 + round(pitch * max(len(line) for k in keep for line in frames[k])), 8 + 12 * max(
        len(frames[k]) for k in keep)
    images = []
    for k in keep:
        images.append(Image.new("L", (width, height), 255))
        for j, line in enumerate(frames[k]):
            for i, c in enumerate(line):
                ImageDraw.Draw(images[-1]).text((4 + round(i * pitch), 4 + 12 * j), c, fill=0)
    images[0].save(path, save_all=True, append_images=images[1:], duration=[80] * (len(images) - 1) + [2000], loop=0)


@torch.no_grad()
def sample(net, cfg, ctx, tag=""):
    """samples.txt, evolution.txt (the most likely characters of theta and of p_O at t = 0, 0.1, ..., 1) and
    evolution.gif (the same at every network call, for 3 samples)."""
    x, trajectory = draw(net, cfg.num_samples, cfg, ctx, torch.Generator(ctx.device).manual_seed(cfg.seed), True)
    line = lambda x: decode(x, cfg.alphabet).replace("\n", "¶")  # noqa: E731  one line, also for new lines
    with open(os.path.join(cfg.out_dir, f"samples{tag}.txt"), "w") as f:
        f.write("".join(f"--- sample {b} ({cfg.sample_steps} steps, {cfg.sampler} sampler)\n"
                        f"{decode(x[b], cfg.alphabet)}\n" for b in range(len(x))))
    with open(os.path.join(cfg.out_dir, f"evolution{tag}.txt"), "w") as f:
        f.write(f"sample 0 over {cfg.sample_steps} steps: the most likely character under the input theta and under "
                f"the output p_O\n")
        for s in [min(trajectory, key=lambda s: abs(s["t"] - k / 10)) for k in range(11)]:
            f.write(f"t={s['t']:.2f} input  |{line(s['input'][0].argmax(-1))}|\n       output |"
                    f"{line(s['output'][0].argmax(-1))}|\n")
        f.write(f"final sample |{line(x[0])}|\n")
    frames, one_hot = [], F.one_hot(x, len(cfg.alphabet))  # evolution.gif: a frame per network call, 3 samples
    for s in trajectory + [{"t": 1.0, "input": one_hot, "output": one_hot, "label": ", the samples"}]:
        lines = [f"t = {s['t']:.3f}{s.get('label', '')}"]
        for b in range(min(3, cfg.num_samples)):
            for name in ("input", "output"):
                text = line(s[name][b].argmax(-1))
                lines += [f"{name:6} |{text[k:k + 64]}|" for k in range(0, len(text), 64)]
            lines.append("")
        frames.append(lines)
    save_text_gif(frames, os.path.join(cfg.out_dir, f"evolution{tag}.gif"))
    ctx.log(f"samples: samples{tag}.txt, evolution{tag}.txt, evolution{tag}.gif")


def whole_words(text):
    """The words of a window that are whole: split at white space, without the first and last (cut by the edges)."""
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
        """Mean -log2 p of each symbol given the order - 1 before it, over every position that has them. (M, L) ->
        float."""
        w, K = windows.long().cpu(), self.K
        p = torch.full((len(w), w.shape[1] - self.order + 1), 1 / K, dtype=torch.float64)
        for k, (grams, counts, contexts, context_counts, followers) in enumerate(self.tables, start=1):
            start = self.order - k  # the k-gram ending at each scored position
            codes = sum(w[:, start + j:w.shape[1] - k + 1 + j] * K ** (k - 1 - j) for j in range(k))
            c_hc, c_h, t_h = (self.lookup(keys, values, q).double() for keys, values, q in (
                (grams, counts, codes), (contexts, context_counts, codes // K), (contexts, followers, codes // K)))
            p = torch.where(c_h > 0, (c_hc + t_h * p) / (c_h + t_h).clamp_min(1), p)
        return -p.log2().mean().item()


TRAINING_TEXT_MODELS = {}  # (the training split's address, length) -> (its words, its NGram)


def training_text_models(train, alphabet):
    """The set of words of the training split and its character 5-gram model, built once per process (a sampling run
    scores every sampler and step count against the same ones). train (N,) symbols -> (set, NGram)."""
    key = (train.data_ptr(), len(train))
    if key not in TRAINING_TEXT_MODELS:
        ascii_only = max(map(ord, alphabet)) < 128  # text8: one byte per character
        codes = torch.tensor([ord(c) for c in alphabet], dtype=torch.uint8 if ascii_only else torch.int32)
        text = codes[train.cpu().long()].numpy().tobytes().decode("ascii" if ascii_only else "utf-32-le")
        TRAINING_TEXT_MODELS[key] = set(text.split()), NGram(train, len(alphabet))
    return TRAINING_TEXT_MODELS[key]


def sample_quality(net, cfg, ctx, data):
    """--eval-samples N: N sampled windows and N test windows, scored against the training split's own words and
    5-gram statistics (so that it works for any --text-file): spelling accuracy (the fraction of whole words that occur
    in the training text), the number of words, the 5-gram bits/char; with --guide-word, the fraction of windows that
    contain it."""
    n = cfg.eval_samples
    test = data["test"][: len(data["test"]) // cfg.seq_len * cfg.seq_len].view(-1, cfg.seq_len)[:n]  # (n, L)
    if len(test) < n:
        raise SystemExit(f"{SCRIPT}: error: --eval-samples {n} needs as many test windows; the test split has "
                         f"{len(test)} of --seq-len {cfg.seq_len}")
    start = time.time()
    x = draw(net, n, cfg, ctx, torch.Generator(ctx.device).manual_seed(cfg.seed + 1))
    figures, (vocabulary, ngram) = {"seconds": time.time() - start}, training_text_models(data["train"], cfg.alphabet)
    for name, windows in (("samples", x), ("test", test)):
        texts = [decode(w, cfg.alphabet) for w in windows]
        words = [w for text in texts for w in whole_words(text)]
        figures[name] = {"spelling_accuracy": sum(w in vocabulary for w in words) / len(words) if words else math.nan,
                         "words": len(words), "ngram_bits_per_char": ngram.bits_per_char(windows)}
        if cfg.guide_word:
            figures[name]["has_word"] = sum(cfg.guide_word in text for text in texts) / len(texts)
    return figures


SWEPT = ("sampler", "sample_steps", "grad_guidance")  # the sampling settings sample_all() sweeps


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
    model = Transformer(cfg.seq_len, cfg.layers, cfg.heads, cfg.width, len(cfg.alphabet)).to(device)
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
