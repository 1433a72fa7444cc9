"""A BFN with another network, through common.py alone: a DiT-style transformer on image patches (Peebles and Xie,
arXiv:2212.09748) trained as a BFN on binarised MNIST (§6) or CIFAR-10 at 256 bins (§5), with its own data loading,
training loop (AdamW, EMA), test bound and the paper's sampler: what a user writes to copy the math into a project.

    python benchmarks/another_network.py cifar --data-dir data --minutes 32 --seed 1     # its bound at 8 and 32

Writes <out-dir>/<data>-transformer-s<seed>.json (the whole test split's bound at each mark, speed, memory) and
samples for benchmarks/score_samples.py. Shapes: B batch, C channels, H x W image, P patch side, N patches, W width."""

import argparse
import copy
import gzip
import json
import math
import os
import pickle
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
import common

BETA_1 = 9.0  # binarised MNIST's final accuracy (§7)
SIGMA_1 = 0.001  # CIFAR-10's at 256 bins (§7)
BATCH = {"mnist": 32, "cifar": 16}  # the scripts' quick presets' batches; AdamW at 1e-3 with the paper's betas
BETAS = {"mnist": (0.9, 0.98), "cifar": (0.9, 0.99)}
STRATIFIED = True  # the times t of a batch drawn one per stratum of [0, 1], as the scripts' --t-draw


def load_images(kind, data_dir):
    """{train, test}: (N, 28, 28) MNIST images (torchvision's idx files) or (N, 3, 32, 32) CIFAR-10 ones (pickles)."""
    if kind == "mnist":
        images = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            with gzip.open(os.path.join(data_dir, "MNIST", "raw", f"{prefix}-images-idx3-ubyte.gz")) as f:
                images[split] = torch.frombuffer(bytearray(f.read()[16:]), dtype=torch.uint8).view(-1, 28, 28)
        return images
    batches = []
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(data_dir, "cifar-10-batches-py", name), "rb") as f:
            batches.append(torch.as_tensor(pickle.load(f, encoding="latin1")["data"]).view(-1, 3, 32, 32))
    return {"train": torch.cat(batches[:5]), "test": batches[5]}


def as_data(kind, images, generator=None):
    """MNIST: a fresh binarisation, pixel classes (B, 28, 28) long; CIFAR: the centres of 256 bins (B, 3, 32, 32)."""
    if kind == "mnist":
        return torch.bernoulli(images.float() / 255, generator=generator).long()
    return common.bin_centres(256)[images.long()]


# Network: a DiT, conditioned on t by adaptive layer norm (adaLN-Zero).


def modulate(x, shift, scale):  # x (B, N, W) scaled and shifted per example by (B, W)
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Self-attention and an MLP, each on the normalised, modulated input and gated: DiT's adaLN-Zero block."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)  # shift, scale and gate of each half, from t
        nn.init.zeros_(self.ada.weight)  # each block starts as the identity
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c):  # (B, N, W), (B, W) -> (B, N, W)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, -1)
        qkv = self.qkv(modulate(self.norm(x), shift1, scale1))
        q, k, v = rearrange(qkv, "b n (s h d) -> s b h n d", s=3, h=self.heads)
        h = rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")
        x = x + gate1[:, None] * self.proj(h)
        return x + gate2[:, None] * self.mlp(modulate(self.norm(x), shift2, scale2))


class PatchTransformer(nn.Module):
    """Psi(input, t): (B, C_in, H, W), (B,) -> (B, C_out, H, W): P x P patches with learned positions, blocks
    conditioned on an embedding of t, a modulated norm and a linear head to each patch's P P C_out outputs."""

    def __init__(self, c_in, c_out, size, patch, width, depth, heads=4):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(c_in, width, patch, stride=patch)
        self.positions = nn.Parameter(torch.randn(1, (size // patch) ** 2, width) * 0.02)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.ada = nn.Linear(width, 2 * width)
        self.head = nn.Linear(width, patch * patch * c_out)
        nn.init.zeros_(self.head.weight)  # the output starts at zero
        nn.init.zeros_(self.head.bias)

    def forward(self, x, t):
        h = rearrange(self.embed(x), "b w y x -> b (y x) w") + self.positions  # (B, N, W)
        freqs = torch.exp(-math.log(10_000) * torch.arange(h.shape[-1] // 2, device=t.device) / (h.shape[-1] // 2))
        args = 1000 * t[:, None] * freqs  # sinusoidal features of t, (B, W / 2)
        c = self.time(torch.cat([args.cos(), args.sin()], -1))  # (B, W)
        for block in self.blocks:
            h = block(h, c)
        out = self.head(modulate(self.norm(h), *self.ada(F.silu(c)).chunk(2, -1)))  # (B, N, P P C_out)
        side = x.shape[-1] // self.patch
        return rearrange(out, "b (y x) (p q c) -> b c (y p) (x q)", y=side, p=self.patch, q=self.patch)


def make_network(kind):
    """Sized to the scripts' quick U-Nets, 1.08M parameters for MNIST and 0.23M for CIFAR-10."""
    if kind == "mnist":  # in: 2 theta_1 - 1; out: K = 2 logits per pixel
        return PatchTransformer(1, 2, 28, patch=4, width=116, depth=4)
    return PatchTransformer(3, 6, 32, patch=4, width=54, depth=4, heads=3)  # mu in; (mu_eps, ln sigma_eps) out


# BFN: the output distribution, L^inf, L^r and the paper's sampler, from common.py.


def output(net, kind, inputs, t):
    """MNIST: ln p_O (B, 28, 28, 2) at theta (B, 28, 28, 2); CIFAR: p_O's (mu_x, sigma_x) (§5.3) at mu (B, 3, H, W)."""
    if kind == "mnist":
        return net(2 * inputs[..., 1][:, None] - 1, t).permute(0, 2, 3, 1).float().log_softmax(-1)
    out = net(inputs, t).float().unflatten(1, (2, 3))  # (B, 2, 3, 32, 32)
    return common.discretised_output(inputs, t, out[:, 0], out[:, 1], SIGMA_1)


def flow(kind, x, t, generator=None):  # theta or mu ~ p_F(. | x; t) (§6.3, §4.5)
    if kind == "mnist":
        return common.discrete_flow(x, t, BETA_1, 2, generator)
    return common.continuous_flow(x, t, SIGMA_1, generator)


def loss_inf(net, kind, x, t, generator=None):  # L^inf of x at t (Algorithm 8 or 5), (B,) nats
    out = output(net, kind, flow(kind, x, t, generator), t)
    if kind == "mnist":
        return common.discrete_loss_inf(x, out.exp(), t, BETA_1)
    return common.discretised_loss_inf(x, common.discretised_k_hat(*out, 256), t, SIGMA_1)


@torch.no_grad()
def bound(net, kind, images, batch, seed=0):
    """The test bound L^inf + L^r in nats/image or bits/dim, with the random draws of the scripts' evaluate()."""
    generator = torch.Generator().manual_seed(seed)
    totals = []
    for start in range(0, len(images), batch):
        x = as_data(kind, images[start : start + batch], generator)
        ones = torch.ones(len(x))
        out = output(net, kind, flow(kind, x, ones, generator), ones)  # L^r (§6.9, §5.6): -ln p_O(x | theta, 1)
        recon = common.discrete_recon_loss(x, out) if kind == "mnist" else common.discretised_recon_loss(x, *out, 256)
        totals.append(recon + loss_inf(net, kind, x, torch.rand(len(x), generator=generator), generator))
    total = torch.cat(totals).double() / (1 if kind == "mnist" else 3072 * math.log(2))
    return {"total": total.mean().item(), "stderr": total.std().item() / math.sqrt(len(total))}


@torch.no_grad()
def sample(net, kind, n, steps, generator):
    """n samples by the paper's sampler, Algorithm 9 or 6, in `steps` steps (steps + 1 network calls)."""

    def probs(inputs, t):  # p_O, as the samplers take it
        if kind == "mnist":
            return output(net, kind, inputs, t).exp()
        return common.discretised_probs(*output(net, kind, inputs, t), 256)

    if kind == "mnist":
        return common.discrete_sample(probs, (n, 28, 28), steps, BETA_1, 2, generator).to(torch.uint8)
    return common.discretised_sample(probs, (n, 3, 32, 32), steps, SIGMA_1, 256, generator)


# Training: the scripts' recipe (AdamW, clipping at 5, the EMA, MNIST's warm-up and cosine) for some minutes.


def train(args):
    """--minutes of training, the clock stopped while it evaluates, the bound at each mark on the whole test split."""
    images = load_images(args.data, args.data_dir)
    torch.manual_seed(args.seed)
    net = make_network(args.data)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    decayed = {id(m.weight) for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}  # weights, not norms
    groups = [{"params": [p for p in net.parameters() if id(p) in decayed], "weight_decay": 0.01}]
    groups.append({"params": [p for p in net.parameters() if id(p) not in decayed], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, 1e-3, BETAS[args.data])
    generator = torch.Generator().manual_seed(args.seed)
    marks = sorted({min(8.0, args.minutes), args.minutes})  # the bound after 8 minutes and at the end
    result = {"data": args.data, "method": "transformer", "minutes": args.minutes, "seed": args.seed, "curve": []}
    result["parameters"] = sum(p.numel() for p in net.parameters())
    spent = 0.0
    step = 0
    while marks:
        tic = time.perf_counter()
        index = torch.randint(len(images["train"]), (BATCH[args.data],), generator=generator)
        x = as_data(args.data, images["train"][index], generator)
        t = common.training_times(len(x), STRATIFIED, generator)
        loss_inf(net, args.data, x, t, generator).mean().backward()
        lr = 1e-3
        if args.data == "mnist":  # a warm-up over 100 steps, then a cosine from 1e-3 to 1e-4 over the minutes
            lr *= min(1.0, (step + 1) / 100) * (0.1 + 0.9 * (1 + math.cos(math.pi * spent / 60 / args.minutes)) / 2)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the EMA's decay warms up as (1 + n) / (10 + n) after n updates, to 0.9999
            for ema_weight, weight in zip(ema.parameters(), net.parameters()):
                ema_weight.lerp_(weight, 1 - min(0.9999, (2 + step) / (11 + step)))
        step += 1
        spent += time.perf_counter() - tic
        if spent >= 60 * marks[0]:
            mark = {"minutes": marks.pop(0), "step": step, **bound(ema, args.data, images["test"], BATCH[args.data])}
            result["curve"].append(mark)
            print(f"{mark['minutes']:g} min, step {step}: {mark['total']:.4f} ± {mark['stderr']:.2g}", flush=True)
    result["peak_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux counts KiB
    result |= {"steps": step, "examples_per_s": step * BATCH[args.data] / spent, "test": result["curve"][-1]}
    for calls in (10, 100):  # samples in the scripts' files, for benchmarks/score_samples.py
        batches = torch.arange(args.num_samples).split(100)
        x = torch.cat([sample(ema, args.data, len(batch), calls - 1, generator) for batch in batches])
        config = {"data_dir": args.data_dir, "bins": 256, "sampler": "paper", "sample_steps": calls - 1}
        saved = {"samples": x, "labels": None, "script": f"bfn_{args.data}.py", "config": config}
        torch.save(saved, os.path.join(args.out_dir, f"{args.data}-transformer-s{args.seed}-{calls}-calls.pt"))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", choices=("mnist", "cifar"), help="binarised MNIST, or CIFAR-10 at 256 bins")
    parser.add_argument("--data-dir", default="data", help="the folder of MNIST/raw or cifar-10-batches-py")
    parser.add_argument("--minutes", type=float, default=8.0, help="training minutes, evaluation excluded")
    parser.add_argument("--out-dir", default="runs/another_network", help="where results and samples go")
    parser.add_argument("--num-samples", type=int, default=500, help="samples at 10 and 100 network calls")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    result = train(args)
    with open(os.path.join(args.out_dir, f"{args.data}-transformer-s{args.seed}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
