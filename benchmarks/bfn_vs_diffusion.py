"""BFN against diffusion at equal compute: the same network body, data, optimiser recipe, batch, precision and minutes
of training on one machine, one method after the other, never at once.

    mnist  binarised MNIST: the BFN of bfn_mnist.py against masked diffusion (MDLM, MD4) in nats/image
    text8  text8 characters: the BFN of bfn_text8.py against masked diffusion, in bits/char
    cifar  CIFAR-10 (or the same format) at 256 bins: the discretised BFN of bfn_cifar.py against a variational
           diffusion model (VDM) with its discretised decoder, in bits/dim

Each method trains the --preset quick network of its script for --minutes of training (the clock stops while it
evaluates) with the script's AdamW, clipping and EMA and the preset's learning-rate schedule (MNIST's cosine decay
spread over the minutes). At each of --eval-at minutes its EMA weights are scored on the preset's test subset, at the
end on the whole test split; then it draws --num-samples at each of --calls network calls (the BFN with the SDE
solver, the diffusion model ancestrally), scored by benchmarks/score_samples.py.
The masked diffusion network is the BFN's with another input layer (one-hot tokens and a mask symbol, K + 1
features); VDM's is the BFN's U-Net predicting the noise (one output per pixel, not two). Every (method, --lr) runs in
a process of its own, so that its peak memory is its own, and writes
<out-dir>/<data>-<method>-lr<lr>.json; then a table and a figure (<data>.svg: bound against minutes) of all of them.

    python benchmarks/bfn_vs_diffusion.py mnist --data-dir data --minutes 1 --num-samples 100   # a quick check
    python benchmarks/bfn_vs_diffusion.py text8 --text-file text8_head.txt --minutes 32 --lr 3e-4 1e-3 3e-3
    python benchmarks/bfn_vs_diffusion.py cifar --data-dir data --minutes 32 --eval-at 4 16 32 --num-samples 100

Shapes: B batch, D data dimensions (positions or pixels), K classes (+ 1: the mask symbol, index K).
"""

import argparse
import copy
import dataclasses
import glob
import importlib
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

SCRIPTS = {"mnist": "bfn_mnist", "text8": "bfn_text8", "cifar": "bfn_cifar"}


# ----------------------------------------------------------------------------------------------------------------------
# Masked (absorbing-state) diffusion in continuous time: Sahoo et al. 2024 (MDLM, arXiv:2406.07524) and Shi et al. 2024
# (MD4, arXiv:2406.04329), with the linear schedule alpha(t) = 1 - t, the probability that a token is still unmasked.
# Cited by the name of each expression in the papers (the forward process, the continuous-time NELBO, the reverse
# step with carry-over unmasking): their equation numbers differ between versions.


def mask(x, t, K, generator=None):
    """z_t ~ q(z_t | x), MDLM's and MD4's forward process with alpha(t) = 1 - t: each position replaced by the mask
    symbol K with probability 1 - alpha(t) = t. x (B, ...) long, t (B,) -> (B, ...) long."""
    t = t.view(-1, *[1] * (x.dim() - 1))
    return torch.where(torch.rand(x.shape, generator=generator, device=x.device) < t, K, x)


def masked_loss(log_p, x, z, t):
    """The continuous-time NELBO of one draw (MDLM's and MD4's L^inf): -alpha'(t) / (1 - alpha(t)) = 1 / t times
    the cross-entropy -ln p(x_l | z_t) summed over the masked positions l (unmasked ones are carried over, at no cost).
    log_p (B, ..., K) = ln p(. | z_t), x, z (B, ...), t (B,) -> (B,) nats. Its mean over t ~ U(0, 1) and z bounds
    -ln p(x), with equality for the exact conditionals (tests/test_vs_diffusion.py)."""
    nll = -log_p.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # (B, ...)
    return (nll * (z == log_p.shape[-1])).flatten(1).sum(1) / t


@torch.no_grad()
def masked_sample(log_p_fn, shape, n, K, generator=None, device=None):
    """Ancestral sampling (MDLM's reverse step p(z_s | z_t), with carry-over unmasking) at n steps t_i = i / n, from
    every position masked at t = 1: between t and s = t - 1/n a masked position is revealed with probability
    (alpha(s) - alpha(t)) / (1 - alpha(t)) = (t - s) / t, as a token drawn from p(. | z_t); revealed tokens stay.
    The last step reveals the rest. log_p_fn(z (B, ...), t (B,)) -> (B, ..., K). n network calls; -> (B, ...) long."""
    z = torch.full(shape, K, dtype=torch.long, device=device)
    for i in range(n, 0, -1):
        t, s = i / n, (i - 1) / n
        probs = log_p_fn(z, torch.full(shape[:1], t, device=device)).exp()
        x = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(shape)
        reveal = (z == K) & (torch.rand(shape, generator=generator, device=device) < (t - s) / t)
        z = torch.where(reveal, x, z)
    return z


# ----------------------------------------------------------------------------------------------------------------------
# Variational diffusion (Kingma et al. 2021, VDM, arXiv:2107.00630): z_t = alpha_t x + sigma_t eps with
# alpha_t^2 = sigmoid(-gamma(t)), sigma_t^2 = sigmoid(gamma(t)) (its variance-preserving forward process), a fixed
# linear schedule between VDM's CIFAR-10 end points, and the network predicting eps; data are the centres of 256 bins
# on [-1, 1]. Cited by the name of each term, as for MDLM.

GAMMA = (-13.3, 5.0)  # gamma(0), gamma(1): VDM's CIFAR-10 setting (there the start point of a learnt schedule)


def gamma(t):
    """gamma(t) = gamma(0) + (gamma(1) - gamma(0)) t, the log noise-to-signal ratio; gamma' is the constant span."""
    return GAMMA[0] + (GAMMA[1] - GAMMA[0]) * t


def vdm_nelbo(eps_fn, x, t, generator=None, bins=256):
    """-ln p(x) <= prior + reconstruction + diffusion (VDM's variational lower bound), one draw of t and the noise:
    prior KL(q(z_1 | x) || N(0, I)); reconstruction -ln p(x | z_0) under VDM's factorised decoder over the bins
    (p(x_i | z_0) proportional to N(z_0,i / alpha_0; x_i, sigma_0^2 / alpha_0^2)); the continuous-time diffusion loss
    in its eps form, 1/2 gamma'(t) ||eps - eps_hat(z_t, t)||^2.
    eps_fn(z (B, ...), t (B,)) -> eps_hat; x (B, ...) bin centres; t (B,) -> {prior, recon, diffusion}: (B,) nats."""

    def noise():
        return torch.randn(x.shape, generator=generator, device=x.device)

    g1 = torch.tensor(GAMMA[1], device=x.device)
    g0 = torch.tensor(GAMMA[0], device=x.device)
    var_1 = torch.sigmoid(g1)  # sigma_1^2; KL(N(alpha_1 x, sigma_1^2) || N(0, 1)) per dimension:
    prior = 0.5 * (var_1 + torch.sigmoid(-g1) * x**2 - 1 - torch.log(var_1))
    z_0 = torch.sigmoid(-g0).sqrt() * x + torch.sigmoid(g0).sqrt() * noise()
    centres = (2 * torch.arange(bins, device=x.device) + 1) / bins - 1  # (bins,)
    logits = -0.5 * torch.exp(-g0) * (z_0[..., None] / torch.sigmoid(-g0).sqrt() - centres) ** 2  # (B, ..., bins)
    x_bin = ((x + 1) * bins / 2).floor().long().clamp(0, bins - 1)
    recon = -logits.log_softmax(-1).gather(-1, x_bin[..., None])[..., 0]
    eps = noise()
    g_t = gamma(t).view(-1, *[1] * (x.dim() - 1))  # (B, 1, ...)
    eps_hat = eps_fn(torch.sigmoid(-g_t).sqrt() * x + torch.sigmoid(g_t).sqrt() * eps, t)
    diffusion = 0.5 * (GAMMA[1] - GAMMA[0]) * (eps - eps_hat) ** 2
    return {k: v.flatten(1).sum(1) for k, v in (("prior", prior), ("recon", recon), ("diffusion", diffusion))}


@torch.no_grad()
def vdm_sample(eps_fn, shape, n, generator=None, device=None, bins=256):
    """Ancestral sampling (VDM's generative model, p(z_s | z_t) = q(z_s | z_t, x = x_hat(z_t))) at n steps t_i = i / n
    from z_1 ~ N(0, I): z_s = alpha_s / alpha_t (z_t - c sigma_t eps_hat) + sqrt(c) sigma_s eps with
    c = 1 - e^(gamma(s) - gamma(t)); at s = 0 the bin whose centre is nearest z_0 / alpha_0 (the decoder's most
    probable). n network calls; -> (B, ...) bin centres."""
    z = torch.randn(shape, generator=generator, device=device)
    ones = torch.ones(shape[0], device=device)

    def sigmoid(v):
        return 1 / (1 + math.exp(-v))

    for i in range(n, 0, -1):
        g_t = gamma(i / n)
        g_s = gamma((i - 1) / n)
        c = -math.expm1(g_s - g_t)
        eps_hat = eps_fn(z, i / n * ones)
        z = math.sqrt(sigmoid(-g_s) / sigmoid(-g_t)) * (z - c * math.sqrt(sigmoid(g_t)) * eps_hat) + math.sqrt(
            c * sigmoid(g_s)
        ) * torch.randn(shape, generator=generator, device=device)
    k = ((z / math.sqrt(sigmoid(-GAMMA[0])) + 1) * bins / 2).floor().clamp(0, bins - 1)
    return (2 * k + 1) / bins - 1


# ----------------------------------------------------------------------------------------------------------------------
# The diffusion side of each data type: the script's network with its input (text8, MNIST) or output (CIFAR) layer
# changed, its loss, its test bound per example and its samples, in the script's format.


class PixelTokens(nn.Module):
    """MNIST's input layer for masked diffusion, in place of the U-Net's Linear(2, C) of [2 theta_0 - 1, 2 t - 1]:
    it reads the same two features, the first +1 (white), -1 (black) or 0 (masked), as one-hot (white, black, mask)
    and 2 t - 1. (B, H, W, 2) -> (B, H, W, C)."""

    def __init__(self, channels):
        super().__init__()
        self.proj = nn.Linear(4, channels)

    def forward(self, f):
        x = f[..., 0]
        return self.proj(
            torch.stack([(x > 0.5).to(f.dtype), (x < -0.5).to(f.dtype), (x.abs() <= 0.5).to(f.dtype), f[..., 1]], -1)
        )


def diffusion_network(kind, cfg, script):
    """The BFN network of the script with the diffusion model's input layer (masked diffusion) or single output."""
    torch.manual_seed(cfg.seed)
    if kind == "cifar":  # the continuous output's network: one output per sub-pixel, the noise
        return script.make_network(dataclasses.replace(cfg, output="continuous"))
    net = script.make_network(cfg)
    if kind == "mnist":
        net.input_projection = PixelTokens(cfg.channels)
    else:
        K = len(script.symbols(cfg))
        net.inp_embedding = nn.Linear(K + 1, cfg.width)
        nn.init.normal_(net.inp_embedding.weight, std=0.02)
        nn.init.zeros_(net.inp_embedding.bias)
    return net


def classes(kind, cfg, script):
    """K: the classes of a data dimension."""
    return 2 if kind == "mnist" else len(script.symbols(cfg)) if kind == "text8" else 256


def diffusion_log_p(net, z, t, kind, K, ctx):
    """Masked diffusion's ln p(. | z_t) in float32: z (B, ...) with K where masked -> (B, ..., K)."""
    with ctx.autocast:
        if kind == "mnist":  # white (0) +1, black (1) -1, masked (2) 0, as the BFN's 2 theta_0 - 1 reads them
            out = net(torch.where(z == K, 0.0, 1 - 2 * z.float()), t)  # (B, H, W): the log-odds of black
        else:
            out = net(F.one_hot(z, K + 1).float(), t)  # (B, L, K)
    out = out.float()
    return torch.stack([F.logsigmoid(-out), F.logsigmoid(out)], -1) if kind == "mnist" else out.log_softmax(-1)


def diffusion_eps(net, z, t, ctx):
    """VDM's eps_hat in float32: z (B, 3, H, W) -> (B, 3, H, W)."""
    with ctx.autocast:
        return net(z, t)[:, 0].float()


def diffusion_loss(net, x, kind, K, ctx, generator=None, terms=False, stratified=True):
    """(B,) nats per example of one draw: the masked NELBO, or VDM's (its diffusion term alone unless terms: the
    others do not depend on the network); the times t as the BFN draws them (common.training_times: stratified over
    the batch, the low-discrepancy sampler VDM and MDLM train with, or each alone)."""
    t = common.training_times(len(x), stratified, generator, x.device)
    if kind == "cifar":
        parts = vdm_nelbo(lambda z, t: diffusion_eps(net, z, t, ctx), x, t, generator)
        return sum(parts.values()) if terms else parts["diffusion"]
    z = mask(x, t, K, generator)
    return masked_loss(diffusion_log_p(net, z, t, kind, K, ctx), x, z, t)


def held_out(kind, cfg, script, data, generator):
    """The test examples the script's evaluate() scores, as the model sees them: (N, ...)."""
    if kind == "text8":
        return script.test_windows(cfg, data).long()
    return script.as_data(data["test"][: cfg.eval_examples or None], cfg, generator)


def diffusion_samples(net, kind, cfg, script, ctx, calls, n, generator):
    """n samples at `calls` network calls, in the script's sample format."""
    K, out = classes(kind, cfg, script), []
    shape = {"mnist": (28, 28), "text8": (getattr(cfg, "seq_len", 0),), "cifar": (3, 32, 32)}[kind]
    for idx in torch.arange(n).split(cfg.batch_size):
        if kind == "cifar":
            out.append(
                vdm_sample(lambda z, t: diffusion_eps(net, z, t, ctx), (len(idx), *shape), calls, generator, ctx.device)
            )
        else:
            out.append(
                masked_sample(
                    lambda z, t: diffusion_log_p(net, z, t, kind, K, ctx),
                    (len(idx), *shape),
                    calls,
                    K,
                    generator,
                    ctx.device,
                )
            )
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# One method at one learning rate: train for the minutes, the bound at each mark, samples at the end.


def config(args, script, lr, out_dir):
    """The script's quick preset with this run's data, learning rate and run directory; CIFAR discretised at 256
    bins. Returns (cfg, runtime) of the script's prepare()."""
    data = ["--text-file", args.text_file] if args.text_file else ["--data-dir", args.data_dir]
    extra = ["--bins", "256", "--output", "discretised"] if args.data == "cifar" else []
    if args.eval_examples:
        extra += ["--eval-examples", str(args.eval_examples)]
    if args.t_draw:
        extra += ["--t-draw", args.t_draw]
    flags = ["--preset", "quick", *data, *extra, "--lr", str(lr), "--out-dir", out_dir, "--device", args.device]
    cfg, runtime, _ = script.prepare([*flags, "--seed", str(args.seed), "--eval-n", "inf"])
    return cfg, runtime


@torch.no_grad()
def bound(method, net, cfg, script, ctx, data, kind, step):
    """The test bound with the EMA weights: {total, stderr} in the script's unit on cfg's test examples."""
    if method == "bfn":  # the script's own evaluation
        result = script.evaluate(net, cfg, ctx, data, step)["n"]["inf"]
        return {"total": result["total"], "stderr": result["stderr"]}
    g = torch.Generator(ctx.device).manual_seed(cfg.seed + 1)
    x, K = held_out(kind, cfg, script, data, g), classes(kind, cfg, script)
    nats = torch.cat(
        [
            diffusion_loss(net, x[k : k + cfg.batch_size], kind, K, ctx, g, terms=True).double()
            for k in range(0, len(x), cfg.batch_size)
        ]
    )  # t stratified within each batch
    per = script.in_paper_unit(nats, cfg)
    return {"total": per.mean().item(), "stderr": per.std().item() / math.sqrt(len(per))}


def run_one(args, method, lr):
    """Train one method at one learning rate for --minutes; its curve, speed, memory and samples -> a json file."""
    script = importlib.import_module(SCRIPTS[args.data])
    name = f"{args.data}-{method}-lr{lr:g}"
    cfg, ctx = config(args, script, lr, os.path.join(args.out_dir, name))
    data, kind = script.load_data(cfg, ctx.device), args.data
    K = classes(kind, cfg, script)
    model = script.build(cfg, ctx, None)[0] if method == "bfn" else diffusion_network(kind, cfg, script).to(ctx.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # evaluation and sampling, as in the scripts
    optimizer = script.make_optimizer(model, lr)  # the script's recipe: AdamW, clipping, EMA and the schedule
    params = sum(p.numel() for p in model.parameters())
    ctx.log(f"{name}: {params / 1e6:.3f}M parameters, {args.minutes} minutes of training, t {cfg.t_draw}")
    marks = sorted({m for m in args.eval_at if m < args.minutes} | {args.minutes})
    curve, spent, step, loss_sum, logged = [], 0.0, 0, 0.0, 0
    torch.manual_seed(args.seed)
    while marks:
        tic = time.perf_counter()
        x = script.get_batch(data, cfg)[0]
        if method == "bfn":
            loss = script.train_loss(model, (x, None), cfg, ctx).mean()
        else:
            loss = diffusion_loss(model, x, kind, K, ctx, stratified=cfg.t_draw == "stratified").mean()
        loss.backward()
        script.optimizer_step(cfg, model, ema, optimizer, step, progress=min(1.0, spent / (60 * args.minutes)))
        loss_sum += loss.item()
        spent, step = spent + time.perf_counter() - tic, step + 1
        if not math.isfinite(loss_sum):
            raise SystemExit(f"bfn_vs_diffusion.py: error: {name}: non-finite loss at step {step}")
        if step % cfg.log_every == 0:
            mean = script.in_paper_unit(loss_sum / (step - logged), cfg)
            ctx.log(
                f"{name} step {step} | {spent / 60:.2f} min | loss {mean:.4g} {script.UNIT} | "
                f"{step * cfg.batch_size / spent:.1f} examples/s"
            )
            loss_sum, logged = 0.0, step
        if spent >= 60 * marks[0]:
            curve.append(
                {"minutes": marks.pop(0), "step": step, **bound(method, ema, cfg, script, ctx, data, kind, step)}
            )
            ctx.log(
                f"{name} at {curve[-1]['minutes']} min (step {step}): {curve[-1]['total']:.4f} ± "
                f"{curve[-1]['stderr']:.2g} {script.UNIT}"
            )
    result = {
        "data": args.data,
        "method": method,
        "lr": lr,
        "parameters": params,
        "minutes": args.minutes,
        "steps": step,
        "examples_per_s": step * cfg.batch_size / spent,
        "batch_size": cfg.batch_size,
        "device": str(ctx.device),
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d"),
        "curve": curve,
        "unit": script.UNIT,
        "command": " ".join(sys.argv),
        "t_draw": cfg.t_draw,
    }
    result["peak_memory_mib"] = (
        torch.cuda.max_memory_allocated(ctx.device) / 2**20
        if ctx.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    result["test"] = bound(method, ema, dataclasses.replace(cfg, eval_examples=0), script, ctx, data, kind, step)
    ctx.log(f"{name}: whole test split {result['test']['total']:.4f} ± {result['test']['stderr']:.2g} {script.UNIT}")
    result["samples"] = {str(c): samples(method, ema, cfg, script, ctx, kind, c, args.num_samples) for c in args.calls}
    with open(os.path.join(args.out_dir, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def samples(method, net, cfg, script, ctx, kind, calls, n):
    """n samples at `calls` network calls, written as the script writes them and scored by score_samples.py."""
    import score_samples

    g = torch.Generator(ctx.device).manual_seed(cfg.seed)
    if method == "bfn":  # the SDE solver: steps + 1 network calls
        cfg = dataclasses.replace(cfg, sampler="sde", sample_steps=calls - 1)
        batches = [
            script.generate(script.prediction(net, cfg, ctx), len(index), cfg, ctx, g)
            for index in torch.arange(n).split(cfg.batch_size)
        ]
        x = torch.cat(batches)
    else:
        x = diffusion_samples(net, kind, cfg, script, ctx, calls, n, g)
        cfg = dataclasses.replace(cfg, sampler="ancestral", sample_steps=calls)  # one network call per step
    path = os.path.join(cfg.out_dir, f"samples-{calls}-calls.pt")
    if kind == "text8":
        script.save_samples(x, [script.decode(row, script.symbols(cfg)) for row in x], cfg, os.path.basename(path))
    else:
        script.save_samples(x, None, cfg, os.path.basename(path))
    return score_samples.main([path, "--device", str(ctx.device)])[path]["samples"]


def cpu_name():
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


# ----------------------------------------------------------------------------------------------------------------------
# The comparison: every run of the data type in its out-dir, as a table and a figure.


def summary(out_dir, kind):
    """A markdown table of every <kind>-*.json in out_dir, and <kind>.svg: the bound against minutes, both methods."""
    runs = []
    for path in sorted(glob.glob(os.path.join(out_dir, f"{kind}-*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    if not runs:
        return ""
    unit = runs[0]["unit"]
    calls = sorted({int(c) for r in runs for c in r.get("samples", {})})
    marks = sorted({c["minutes"] for r in runs for c in r["curve"]})  # runs of different lengths: blanks
    quality = "spelling_accuracy" if kind == "text8" else "frechet_a"
    lines = [
        "| method | lr | minutes | params | steps | examples/s | peak MiB | "
        + " | ".join(f"{m:g} min" for m in marks)
        + f" | whole test ({unit}) | "
        + " | ".join(f"{quality} @{c}" for c in calls)
        + " |"
    ]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for r in runs:
        at = {c["minutes"]: f"{c['total']:.4g} ± {c['stderr']:.2g}" for c in r["curve"]}
        lines.append(
            f"| {r['method']} | {r.get('lr', 1e-3):g} | {r['minutes']:g} | {r['parameters'] / 1e6:.3f}M | "
            f"{r['steps']:,} | {r['examples_per_s']:.1f} | {r['peak_memory_mib']:.0f} | "
            + " | ".join(at.get(m, "") for m in marks)
            + f" | {r['test']['total']:.4g}"
            f" ± {r['test']['stderr']:.2g} | "
            + " | ".join(
                f"{r['samples'][str(c)][quality]:.3g}" if str(c) in r.get("samples", {}) else "" for c in calls
            )
            + " |"
        )
    with open(os.path.join(out_dir, f"{kind}.svg"), "w") as f:
        f.write(figure(runs, f"{kind}: test bound ({unit}) against minutes of training"))
    return "\n".join(lines)


METHOD_NAMES = {"bfn": "BFN", "diffusion": "diffusion", "transformer": "BFN, transformer"}  # another_network.py's
METHOD_COLOURS = {"bfn": "#1f77b4", "diffusion": "#ff7f0e", "transformer": "#2ca02c"}


def figure(runs, title, w=640, h=400, m=60):
    """An SVG line plot of each run's curve (minutes on a log2 axis, +- one standard error), BFN in blue, diffusion in
    orange."""
    points = [(c["minutes"], c["total"] + e * c["stderr"]) for r in runs for c in r["curve"] for e in (-1, 1)]
    (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*points)]
    x0, x1, y1 = math.log2(x0), max(math.log2(x1), math.log2(x0) + 1), y1 + (y1 == y0)

    def X(v):  # minutes -> the x pixel, on a log2 axis
        return m + (math.log2(v) - x0) / (x1 - x0) * (w - 2 * m)

    def Y(v):  # a bound -> the y pixel
        return h - m - (v - y0) / (y1 - y0) * (h - 2 * m)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
        f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="14">{title}</text>',
        f'<path d="M{m},{m} V{h - m} H{w - m}" stroke="black" fill="none"/>',
    ]
    for v in sorted({c["minutes"] for r in runs for c in r["curve"]}):
        out.append(f'<text x="{X(v):.1f}" y="{h - m + 18}" text-anchor="middle">{v:g}</text>')
    for k in range(5):
        v = y0 + k * (y1 - y0) / 4
        out.append(f'<text x="{m - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    out.append(f'<text x="{w / 2}" y="{h - 16}" text-anchor="middle">minutes of training</text>')
    for k, r in enumerate(runs):
        colour = METHOD_COLOURS[r["method"]]
        label = f"{METHOD_NAMES[r['method']]} lr {r.get('lr', 1e-3):g}"
        path = " ".join(
            f"{'M' if j == 0 else 'L'}{X(c['minutes']):.1f},{Y(c['total']):.1f}" for j, c in enumerate(r["curve"])
        )
        dash = "" if r.get("lr", 1e-3) == runs[0].get("lr", 1e-3) else "6,3"  # the first learning rate solid
        out.append(f'<path d="{path}" stroke="{colour}" stroke-width="2" fill="none" stroke-dasharray="{dash}"/>')
        out += [
            f'<path d="M{X(c["minutes"]):.1f},{Y(c["total"] - c["stderr"]):.1f} '
            f'V{Y(c["total"] + c["stderr"]):.1f}" stroke="{colour}"/><circle cx="{X(c["minutes"]):.1f}" '
            f'cy="{Y(c["total"]):.1f}" r="3" fill="{colour}"/>'
            for c in r["curve"]
        ]  # each mark and its error
        out.append(f'<text x="{w - m - 4}" y="{m + 16 * k + 12}" text-anchor="end" fill="{colour}">{label}</text>')
    return "\n".join(out + ["</svg>\n"])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:3]),
        formatter_class=type(
            "Formatter", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {}
        ),
    )
    p.add_argument("data", choices=SCRIPTS, help="the data type: mnist, text8 or cifar")
    p.add_argument(
        "--method",
        choices=("both", "bfn", "diffusion"),
        default="both",
        help="both: BFN then diffusion at each --lr, each in its own process",
    )
    p.add_argument("--minutes", type=float, default=8.0, help="training minutes of each run, evaluation excluded")
    p.add_argument(
        "--eval-at",
        type=float,
        nargs="+",
        default=[2, 4, 8, 16, 32],
        help="minutes at which the bound is taken (those below --minutes; and at --minutes)",
    )
    p.add_argument("--lr", type=float, nargs="+", help="peak learning rates, each method at each (none: the preset's)")
    p.add_argument("--calls", type=int, nargs="+", default=[10, 25, 100], help="network calls per sample")
    p.add_argument("--num-samples", type=int, default=500, help="samples scored at each --calls")
    p.add_argument("--eval-examples", type=int, default=0, help="test examples at the marks (0: the preset's)")
    p.add_argument("--data-dir", default="data", help="the script's --data-dir (MNIST, CIFAR-10)")
    p.add_argument("--text-file", default="", help="text8: a text file instead of text8.zip")
    p.add_argument("--out-dir", default="runs/vs_diffusion", help="where runs, results and the figure go")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--t-draw",
        choices=("uniform", "stratified"),
        help="how both methods draw the times t of a training batch (default: the script's)",
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one run for a parent that prints
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.num_samples < 1 or min(args.calls) < 2 or min(args.eval_at) <= 0:
        p.error("--minutes and --eval-at must be positive, --num-samples at least 1, --calls at least 2")
    script = importlib.import_module(SCRIPTS[args.data])
    args.lr = args.lr or [script.PRESETS["quick"]["lr"]]
    os.makedirs(args.out_dir, exist_ok=True)
    if args.method != "both" and len(args.lr) == 1:
        run_one(args, args.method, args.lr[0])
    else:  # each run in a process of its own, one after the other
        same = [
            args.data,
            "--minutes",
            str(args.minutes),
            "--eval-at",
            *map(str, args.eval_at),
            "--calls",
            *map(str, args.calls),
            "--num-samples",
            str(args.num_samples),
            "--eval-examples",
            str(args.eval_examples),
            "--data-dir",
            args.data_dir,
            "--text-file",
            args.text_file,
            "--out-dir",
            args.out_dir,
            "--device",
            args.device,
            "--seed",
            str(args.seed),
        ] + (["--t-draw", args.t_draw] if args.t_draw else [])
        for lr in args.lr:
            for method in ("bfn", "diffusion") if args.method == "both" else (args.method,):
                run = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), *same, "--method", method, "--lr", str(lr), "--child"]
                )
                if run.returncode:
                    raise SystemExit(
                        f"bfn_vs_diffusion.py: error: the {method} run at --lr {lr:g} stopped (exit "
                        f"{run.returncode}; its message is above); earlier runs are in {args.out_dir}"
                    )
    if not args.child:
        print(summary(args.out_dir, args.data))


if __name__ == "__main__":
    main()
