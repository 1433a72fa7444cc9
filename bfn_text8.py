"""Bayesian Flow Network on text8 characters (§6 of Graves et al., arXiv:2308.07037): discrete data, K = 27.

Trains the authors' non-causal transformer with the continuous-time loss L^inf (Algorithm 8), evaluates the test bound
L^inf + L^r and L^n + L^r in bits/char (the paper: 1.41), and samples with Algorithm 9 or the ODE or SDE solver of
common.py. --text-file trains on any UTF-8 text, its alphabet its own characters, beta(1) by common.discrete_beta_1;
--vocab N trains on N subword tokens (byte-pair merges of those characters), still scored in bits/char.
Writes log.txt, ckpt.pt, eval.json, samples.txt and .pt, and evolution.txt/.gif (theta and p_O over time) to --out-dir.

    python bfn_text8.py --preset quick --text-file book.txt   # a small transformer on any text, minutes on a CPU
    python bfn_text8.py --steps 1000                          # the paper's model and optimiser (text8 downloaded)
    torchrun --nproc_per_node=8 bfn_text8.py --batch-size 104 --grad-accum 4   # the paper's batch on 8 GPUs
    python bfn_text8.py --sample-only --sampler sde --sample-steps 100 --num-samples 200   # then, to score them:
    python benchmarks/score_samples.py runs/bfn_text8/samples-sde-100.pt
    python bfn_text8.py --sample-only --infill "the ____ of the united states" --particles 8
    python bfn_text8.py --sample-only --guide-word zero --grad-guidance 3     # steer any model towards a word
    python bfn_text8.py --preset quick --vocab 1024 --text-file book.txt      # K = 1024 subword tokens

Shapes: B batch, L sequence length (--seq-len), K symbols (27 for text8; --vocab), W transformer width.
"""
import argparse, collections, contextlib, copy, ctypes, dataclasses, datetime, functools, json, math, os, shlex, shutil
import signal, sys, time, types, zipfile, zlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel as DDP

from common import discrete_beta_1, discrete_beta_1_tokens, discrete_flow, discrete_guided_probs, \
    discrete_loss_inf, discrete_loss_n, discrete_recon_loss, discrete_sample, discrete_sample_ode, \
    discrete_sample_sde, discrete_sample_smc, recorded, replace_known_probs, stratified_steps, stratified_times

SCRIPT, UNIT, BETAS = "bfn_text8.py", "bits/char", (0.9, 0.98)


def opt(default, help=None, fixed=False, **kwargs):
    """A setting: its default; its --help (None: not a flag, the presets set it); whether it fixes the model or the
    data (a checkpoint keeps it); argparse's choices."""
    return dataclasses.field(default=default, metadata=dict(help=help, fixed=fixed, **kwargs))


@dataclasses.dataclass
class Config:
    """Every setting of a run; each with help is a flag (--batch-size for batch_size). The defaults are the paper's."""
    data_dir: str = opt("data", "where text8.zip is, or is downloaded to")
    text_file: str = opt("", "train on this UTF-8 text file instead of text8")
    seq_len: int = opt(256, "characters (with --vocab: tokens) per window", True)
    vocab: int = opt(0, "K subword tokens: byte-pair merges of the characters, learnt on the training split (0: the "
                        "characters)", True)
    beta_1: float = opt(0.0, "final accuracy beta(1) of beta(t) = beta(1) t^2 (§6.8); 0: 0.5625 for K >= 27, larger "
                             "below (discrete_beta_1), 20.4054 / K with --vocab (discrete_beta_1_tokens)", True)
    layers: int = opt(24, "transformer layers", True)
    heads: int = opt(12, "attention heads", True)
    width: int = opt(768, "transformer width (a multiple of 2 x --heads)", True)
    steps: int = opt(100_000, "optimiser steps to train (the total, also when resuming)")
    batch_size: int = opt(128, "windows per process and step (global: x --grad-accum x processes); also of "
                               "evaluation and sampling")
    grad_accum: int = opt(1, "batches accumulated per optimiser step")
    lr: float = opt(1e-4, "AdamW learning rate")
    eval_n: tuple = opt(("inf", "10", "100"), "steps n of the test bounds L^n + L^r (inf: continuous time)")
    eval_examples: int = opt(0, "evaluate on N test windows drawn with a fixed seed (0: all)")
    eval_repeats: int = opt(1, "passes over them with fresh noise")
    sampler: str = opt("paper", "Algorithm 9, or the second-order ODE or SDE solver", choices=("paper", "ode", "sde"))
    sample_steps: int = opt(1000, "generation steps n")
    num_samples: int = opt(8, "windows to sample (samples.txt, samples.pt), or completions of --prompt or --infill")
    prompt: str = opt("", "sample continuations of this text (of the alphabet), fixed at the start of every window")
    infill: str = opt("", "fill in the underscores of this text (with --vocab each _ is a token), fixed at the start "
                          "of every window")
    particles: int = opt(1, "with --prompt, --infill: sequential Monte Carlo over P particles (1: replacement)")
    guide_word: str = opt("", "with --grad-guidance: steer samples towards containing this word (with --vocab: its "
                              "tokens when spelt alone; ' zero' for the word after a space)")
    grad_guidance: float = opt(0.0, "gradient guidance weight towards --guide-word, through the network")
    preset: str = opt("paper", "the paper's settings, or a small CPU recipe; flags given win",
                      choices=("paper", "quick"))
    out_dir: str = opt("runs/bfn_text8", "the run directory")
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
    alphabet: str = opt("", fixed=True)  # the characters in order: text8's, or the --text-file's own
    merges: tuple = opt((), fixed=True)  # --vocab: token len(alphabet) + i is the pair merges[i] of tokens (a, b)
    chars: float = opt(1.0, fixed=True)  # characters per symbol in the training split (the unit of the training log)
    lr_warmup: int = opt(0)  # steps of linear learning-rate warm-up (the paper: none)
    lr_decay: str = opt("none")  # cosine: down to 0.1 --lr at --steps (the paper: constant)


PRESETS = {"paper": {}, "quick": dict(layers=4, heads=4, width=128, seq_len=32, batch_size=16, lr=1e-3, steps=17904,
                                      eval_examples=1000, num_samples=4, sample_steps=100)}


def check(cfg):
    """The settings that depend on each other -> (cfg, with the alphabet, --vocab's merges and beta(1) resolved; the
    first problem, a one-line message, or None)."""
    if not cfg.alphabet:  # the text's own characters, or text8's when it has no others
        alphabet = "".join(sorted(set(read_text(cfg.text_file)))) if cfg.text_file else ALPHABET
        cfg = dataclasses.replace(cfg, alphabet=ALPHABET if set(alphabet) <= set(ALPHABET) else alphabet)
    if cfg.vocab > len(cfg.alphabet) and not cfg.merges:
        cfg = dataclasses.replace(cfg, **learn_tokens(cfg))
    if cfg.beta_1 == 0:
        cfg = dataclasses.replace(cfg, beta_1=discrete_beta_1_tokens(cfg.vocab) if cfg.vocab else discrete_beta_1(
            len(cfg.alphabet)))
    text, outside = cfg.prompt or cfg.infill or cfg.guide_word, set(cfg.prompt + cfg.guide_word + cfg.infill.replace(
        "_", "")) - set(cfg.alphabet)
    return cfg, next((message for bad, message in [
        *[(getattr(cfg, k) < 1, f"--{k.replace('_', '-')} must be at least 1, got {getattr(cfg, k)}") for k in (
            "batch_size", "grad_accum", "eval_repeats", "sample_steps", "num_samples", "particles", "log_every",
            "seq_len", "layers", "heads")],
        (cfg.beta_1 < 0 or cfg.lr <= 0 or cfg.grad_guidance < 0, "--beta-1 and --grad-guidance must be at least 0, "
         "--lr positive"),
        (len(set(cfg.alphabet)) != len(cfg.alphabet) or not 2 <= len(cfg.alphabet) <= 4096,
         f"the alphabet needs 2 to 4096 different symbols, got {len(cfg.alphabet)} ({len(set(cfg.alphabet))} "
         "different)"),
        (cfg.vocab and cfg.vocab <= len(cfg.alphabet), f"--vocab must exceed the {len(cfg.alphabet)} characters of "
         f"the alphabet (0: characters), got {cfg.vocab}"),
        (cfg.width % cfg.heads != 0 or cfg.width // cfg.heads % 2 != 0,
         f"--width must be a multiple of 2 x --heads, got width {cfg.width} and heads {cfg.heads}"),
        (any(n != "inf" and not (n.isdigit() and int(n) >= 1) for n in cfg.eval_n),
         f"--eval-n takes inf or positive integers, got {' '.join(cfg.eval_n)}"),
        (bool(cfg.prompt) and bool(cfg.infill), "--prompt and --infill exclude each other"),
        (bool(outside), f"--prompt, --infill and --guide-word take the symbols of the alphabet {cfg.alphabet!r}; "
                        f"{''.join(sorted(outside))!r} {'is' if len(outside) == 1 else 'are'} not in it"),
        (bool(cfg.infill) and "_" not in cfg.infill, "--infill needs at least one _ to fill in"),
        (len(text) > cfg.seq_len, f"--prompt, --infill or --guide-word is longer than --seq-len {cfg.seq_len}"),
        (bool(cfg.grad_guidance) != bool(cfg.guide_word), "--grad-guidance and --guide-word go together"),
        (cfg.particles > 1 and not (cfg.prompt or cfg.infill), "--particles is for --prompt and --infill"),
        (cfg.particles > 1 and cfg.sampler == "ode", "--particles needs a stochastic sampler (paper, sde): the ODE "
         "solver is deterministic after its first draw, so there is nothing to reweight"),
        (cfg.eval_only and cfg.sample_only, "--eval-only and --sample-only exclude each other"),
        (cfg.resume and bool(cfg.init_from), "--resume and --init-from exclude each other")] if bad), None)


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
    """{train, val, test}: (N,) symbols on the device; the first 90% of the characters, the next 5%, the last 5%, each
    with --vocab in tokens. A K that leaves no room for theta stops here, before the first step."""
    if cfg.text_file:
        text = read_text(cfg.text_file)
        x = encode(text.encode() if cfg.alphabet == ALPHABET and text.isascii() else text, cfg.alphabet, cfg.text_file)
    else:
        x = encode(load_text8(cfg.data_dir), cfg.alphabet, "text8")
    a, b = len(x) * 90 // 100, len(x) * 95 // 100
    data = {"train": x[:a], "val": x[a:b], "test": x[b:]}
    if cfg.vocab:
        data = {split: tokenize(decode(part, cfg.alphabet), cfg) for split, part in data.items()}
    if len(data["test"]) < cfg.seq_len:
        raise SystemExit(f"{SCRIPT}: error: the text is too short ({len(x):,} characters) for its last 5% to hold a "
                         f"window of --seq-len {cfg.seq_len}")
    need, free = 12 * cfg.batch_size * cfg.seq_len * len(symbols(cfg)) * 4, math.inf  # (B, L, K) float32 tensors: 10
    # in a training step (measured at K = 4096, RESULTS), 2 to spare
    with contextlib.suppress(ValueError, OSError, RuntimeError):
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else os.sysconf("SC_AVPHYS_PAGES") * \
            os.sysconf("SC_PAGE_SIZE")
    if need > free:
        raise SystemExit(f"{SCRIPT}: error: K = {len(symbols(cfg))} symbols need about {need / 2 ** 30:.1f} GiB at "
                         f"--batch-size {cfg.batch_size} and --seq-len {cfg.seq_len}, and {device} has "
                         f"{free / 2 ** 30:.1f} GiB free: lower --batch-size (and raise --grad-accum), --seq-len or "
                         "--vocab")
    return {split: part.to(device) for split, part in data.items()}


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
    """Nats per window -> the paper's unit, bits/char: nats / (L ln 2), with --vocab over the training split's mean
    characters per token (the test bound divides each window by its own characters)."""
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
    return [parts[0]] + [" " + w for w in parts[1:]]


def merge(tokens, pair, new):
    """Every non-overlapping occurrence of pair (a, b) in the list tokens, left to right, replaced by new."""
    out, i = [], 0
    while i < len(tokens):
        hit = i + 1 < len(tokens) and (tokens[i], tokens[i + 1]) == pair
        out.append(new if hit else tokens[i])
        i += 1 + hit
    return out


def learn_merges(text, alphabet, n):
    """n merges learnt on text: each time, the most frequent pair of adjacent tokens within a word (ties: the first
    seen) becomes the next token. -> ((a, b), ...): token len(alphabet) + i is merges[i]."""
    counts = collections.Counter(words(text))
    seqs, freq = [[alphabet.index(c) for c in w] for w in counts], list(counts.values())
    pairs, where = collections.Counter(), collections.defaultdict(set)  # pair -> its count; the words that hold it
    for w, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += freq[w]
            where[pair].add(w)
    merges = []
    for new in range(len(alphabet), len(alphabet) + n):
        best, count = max(pairs.items(), key=lambda item: item[1], default=(None, 0))
        if count < 1:
            raise SystemExit(f"{SCRIPT}: error: the training text has nothing left to merge at {new} tokens: "
                             f"--vocab at most {new}")
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
    """--vocab K: {merges: K - len(alphabet) of them learnt on the training split (the first 90% of the characters;
    never validation or test), chars: its characters per token}, cached beside the text as bpe-CRC-K.json."""
    text = read_text(cfg.text_file) if cfg.text_file else load_text8(cfg.data_dir).decode()
    train = text[:len(text) * 90 // 100]
    crc = zlib.crc32((cfg.alphabet + "\0" + train).encode())
    folder = os.path.dirname(cfg.text_file) if cfg.text_file else cfg.data_dir
    path = os.path.join(folder, f"bpe-{crc:08x}-{cfg.vocab}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        return {"merges": tuple(map(tuple, saved["merges"])), "chars": saved["chars"]}
    merges = learn_merges(train, cfg.alphabet, cfg.vocab - len(cfg.alphabet))
    saved = {"merges": merges, "chars": len(train) / len(tokenize(train, dataclasses.replace(cfg, merges=merges)))}
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        json.dump(saved, f)
    os.replace(f"{path}.{os.getpid()}.tmp", path)  # whole or not at all, also with torchrun's processes racing
    return saved


@functools.lru_cache(maxsize=4)
def vocabulary(alphabet, merges):
    strings = list(alphabet)
    for a, b in merges:
        strings.append(strings[a] + strings[b])
    return tuple(strings)


def symbols(cfg):
    """The K symbols as strings: the characters, then (--vocab) each merge's two tokens joined."""
    return vocabulary(cfg.alphabet, cfg.merges)


def tokenize(text, cfg):
    """text -> (N,) symbols (int32): each word's characters, then the merges applied in the order learnt. A character
    not in the alphabet stops with its position."""
    rank, base, cache, out, at = {pair: i for i, pair in enumerate(cfg.merges)}, len(cfg.alphabet), {}, [], 0
    for word in words(text):
        if word not in cache:
            if bad := [i for i, c in enumerate(word) if c not in cfg.alphabet]:
                raise SystemExit(f"{SCRIPT}: error: the character {word[bad[0]]!r} at position {at + bad[0]:,} is not "
                                 f"in the alphabet {cfg.alphabet!r}")
            tokens = [cfg.alphabet.index(c) for c in word]
            while len(tokens) > 1 and (pair := min(zip(tokens, tokens[1:]), key=lambda p: rank.get(p, math.inf))) \
                    in rank:
                tokens = merge(tokens, pair, base + rank[pair])
            cache[word] = tokens
        out += cache[word]
        at += len(word)
    return torch.tensor(out, dtype=torch.int32)


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
    t = stratified_times(len(x), device=x.device) if cfg.t_draw == "stratified" else torch.rand(len(x),
                                                                                               device=x.device)
    theta = discrete_flow(x, t, cfg.beta_1, len(cfg.alphabet) + len(cfg.merges))  # K (no hashing of merges per step)
    return discrete_loss_inf(x, output_log_probs(net, theta, t, ctx).exp(), t, cfg.beta_1)


@torch.no_grad()
def evaluate(net, cfg, ctx, data, step):
    """The test bound -ln p(x) <= L^n + L^r (§6.6, §6.9) for each n in --eval-n (inf: L^inf, §6.7) on --eval-examples
    test windows, over --eval-repeats passes with fresh noise, the steps i of L^n stratified over the windows: the mean
    in bits/char (each window's bits over its characters) and its standard error over windows, in eval.json and the
    log."""
    windows, K = evaluation_set(data["test"], cfg), len(symbols(cfg))
    g = torch.Generator(ctx.device).manual_seed(hash((cfg.seed, -1, step)) % 2 ** 62)
    log_p = lambda x, t: output_log_probs(net, discrete_flow(x, t, cfg.beta_1, K, g), t, ctx)  # noqa: E731
    losses, recon = {n: [] for n in cfg.eval_n}, []
    for _ in range(cfg.eval_repeats):
        steps = {n: stratified_steps(int(n), len(windows), g, windows.device) for n in cfg.eval_n if n != "inf"}
        for start in range(0, len(windows), cfg.batch_size):
            x = windows[start:start + cfg.batch_size].long()
            recon.append(discrete_recon_loss(x, log_p(x, torch.ones(len(x), device=x.device))))
            for n in cfg.eval_n:
                if n == "inf":
                    t = torch.rand(len(x), generator=g, device=x.device)
                    losses[n].append(discrete_loss_inf(x, log_p(x, t).exp(), t, cfg.beta_1))
                else:
                    i = steps[n][start:start + len(x)]
                    losses[n].append(discrete_loss_n(x, log_p(x, (i - 1) / int(n)), i, int(n), cfg.beta_1, g))
    chars = torch.tensor([len(c) for c in symbols(cfg)], device=windows.device)[windows.long()].sum(1)
    report(losses, recon, cfg, ctx, step, chars.double())


def report(losses, recon, cfg, ctx, step, chars):
    """Per-window losses in nats, pass after pass ({n: [(B,), ...]}, [(B,), ...]), and each window's characters (N,)
    -> the bound in bits/char: its mean and standard error over windows (each window's passes averaged first), in
    eval.json (with --vocab also in bits/token) and the log."""
    bits = lambda v: torch.cat(v).double().view(cfg.eval_repeats, -1).mean(0) / math.log(2)  # noqa: E731  per window
    recon, result = bits(recon), {}
    for n, parts in losses.items():
        total = bits(parts) + recon
        result[n] = {"loss": ((total - recon) / chars).mean().item(), "recon": (recon / chars).mean().item(),
                     "total": (total / chars).mean().item(), "stderr": (total / chars).std().item() / math.sqrt(
                         len(total)) if len(total) > 1 else float("nan")}
        if cfg.vocab:
            result[n]["bits_per_token"] = {"total": total.mean().item() / cfg.seq_len, "recon": recon.mean().item() /
                                           cfg.seq_len}
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"step": step, "split": "test", "unit": UNIT, "examples": len(total), "repeats": cfg.eval_repeats,
                   "n": result}, f, indent=1)
    bounds = " | ".join(f"L^{n}+L^r {r['total']:.4g} ± {r['stderr']:.2g} (L^r {r['recon']:.3g})" for n, r in
                        result.items())
    ctx.log(f"test bound at step {step}: {bounds} {UNIT} | eval.json")


SAMPLERS = {"paper": discrete_sample, "ode": discrete_sample_ode, "sde": discrete_sample_sde}


@torch.no_grad()
def draw(net, n, cfg, ctx, generator, trajectory=None, known=None):
    """n samples (n, L) of the --sampler (Algorithm 9, or the ODE or SDE solver) at --sample-steps, in batches of
    --batch-size. trajectory: a list that records each network call for the first 8 (theta and p_O); known (n, L):
    symbols to condition on, -1 where unknown, by replacement or with --particles by sequential Monte Carlo (common.py,
    Conditioning). With --guide-word, gradient guidance towards it."""
    P, K, word = cfg.particles if known is not None else 1, len(symbols(cfg)), tokenize(cfg.guide_word, cfg).tolist()
    fn, out = lambda theta, t: guided_probs(net, theta, t, cfg, ctx, word), []  # noqa: E731
    for idx in torch.arange(n).split(max(1, cfg.batch_size // P)):
        if P > 1:
            out.append(discrete_sample_smc(fn, known[idx], cfg.sample_steps, cfg.beta_1, K, P, cfg.sampler == "sde",
                                           generator))
            continue
        one = fn if known is None else replace_known_probs(fn, known[idx])
        one = one if trajectory is None or idx[0] > 0 else recorded(one, trajectory, rows=8)
        out.append(SAMPLERS[cfg.sampler](one, (len(idx), cfg.seq_len), cfg.sample_steps, cfg.beta_1, K,
                                         generator=generator, device=ctx.device))
    return torch.cat(out)


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
def complete(net, cfg, ctx, data):
    """--prompt or --infill: --num-samples windows that start with the given text (its underscores, for --infill, left
    to the network, as is everything after it), given it by replacement or, with --particles, sequential Monte Carlo;
    in prompt.txt or infill.txt, and prompt-*.pt or infill-*.pt for benchmarks/score_samples.py."""
    text, kind = cfg.prompt or cfg.infill, "prompt" if cfg.prompt else "infill"
    if not text:
        return
    known, start = torch.full((cfg.seq_len,), -1, dtype=torch.long), time.time()  # with --vocab: _ is one token
    given = sum(([-1] * (j > 0) + tokenize(part, cfg).tolist() for j, part in enumerate(text.split("_"))), []) \
        if cfg.infill else tokenize(text, cfg).tolist()
    known[:len(given)] = torch.tensor(given, dtype=torch.long)
    g, n = torch.Generator(ctx.device).manual_seed(cfg.seed + 2), cfg.num_samples
    x = draw(net, n, cfg, ctx, g, known=known.to(ctx.device).expand(n, -1))
    samples, name = [decode(row, symbols(cfg)) for row in x], f"{kind}{tag(cfg)}-p{cfg.particles}.pt"
    with open(os.path.join(cfg.out_dir, f"{kind}.txt"), "w") as f:
        f.write(f"{kind} |{text}| ({cfg.sampler} sampler, {cfg.sample_steps} steps, {cfg.particles} particles)\n" +
                "".join(f"--- {b}\n{s}\n" for b, s in enumerate(samples)))
    save_samples(x, samples, cfg, name)
    ctx.log(f"{kind} ({cfg.sampler}, {cfg.sample_steps} steps, {cfg.particles} particles, {time.time() - start:.0f} "
            f"s): {n} completions | {kind}.txt, {name}")


# ----------------------------------------------------------------------------------------------------------------------
# Figures: samples as text and as an animation, and the samples themselves for benchmarks/score_samples.py.

def tag(cfg):
    """Sampling settings for a file name: -SAMPLER-STEPS, then -ggW for --grad-guidance W."""
    return f"-{cfg.sampler}-{cfg.sample_steps}" + f"-gg{cfg.grad_guidance:g}" * (cfg.grad_guidance != 0)


def save_samples(x, texts, cfg, name):
    """Samples (N, L) and their text, with the run's settings, for benchmarks/score_samples.py."""
    torch.save({"samples": x.cpu(), "texts": texts, "script": SCRIPT, "config": dataclasses.asdict(cfg)},
               os.path.join(cfg.out_dir, name))


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
def sample(net, cfg, ctx, data):
    """samples.txt and samples-SAMPLER-STEPS.pt (tag()), evolution.txt (the most likely characters of theta and of p_O
    at t = 0, 0.1, ..., 1) and evolution.gif (the same at every network call, for 3 samples)."""
    if cfg.prompt or cfg.infill:  # --prompt, --infill: the completions instead
        return complete(net, cfg, ctx, data)
    trajectory, g = [], torch.Generator(ctx.device).manual_seed(cfg.seed)
    x = draw(net, cfg.num_samples, cfg, ctx, g, trajectory)
    line = lambda x: decode(x, symbols(cfg)).replace("\n", "¶")  # noqa: E731  one line, also for new lines
    texts = [decode(row, symbols(cfg)) for row in x]
    with open(os.path.join(cfg.out_dir, "samples.txt"), "w") as f:
        f.write("".join(f"--- sample {b} ({cfg.sample_steps} steps, {cfg.sampler} sampler)\n{s}\n"
                        for b, s in enumerate(texts)))
    save_samples(x, texts, cfg, f"samples{tag(cfg)}.pt")
    with open(os.path.join(cfg.out_dir, "evolution.txt"), "w") as f:
        f.write(f"sample 0 over {cfg.sample_steps} steps: the most likely character under the input theta and under "
                f"the output p_O\n")
        for s in [min(trajectory, key=lambda s: abs(s["t"] - k / 10)) for k in range(11)]:
            f.write(f"t={s['t']:.2f} input  |{line(s['input'][0].argmax(-1))}|\n       output |"
                    f"{line(s['output'][0].argmax(-1))}|\n")
        f.write(f"final sample |{line(x[0])}|\n")
    frames, one_hot = [], F.one_hot(x, len(symbols(cfg)))  # evolution.gif: a frame per network call, 3 samples
    for s in trajectory + [{"t": 1.0, "input": one_hot, "output": one_hot, "label": ", the samples"}]:
        lines = [f"t = {s['t']:.3f}{s.get('label', '')}"]
        for b in range(min(3, cfg.num_samples)):
            for name in ("input", "output"):
                text = line(s[name][b].argmax(-1))
                lines += [f"{name:6} |{text[k:k + 64]}|" for k in range(0, len(text), 64)]
            lines.append("")
        frames.append(lines)
    save_text_gif(frames, os.path.join(cfg.out_dir, "evolution.gif"))
    ctx.log(f"samples ({cfg.sampler}, {cfg.sample_steps} steps): samples.txt, samples{tag(cfg)}.pt, evolution.txt, "
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
    model = Transformer(cfg.seq_len, cfg.layers, cfg.heads, cfg.width, len(symbols(cfg)))
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
