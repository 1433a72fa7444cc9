"""Conditioning a trained BFN on known values, beyond the paper: complete test images given part of them (inpainting),
or text given a prompt or the words around gaps, by replacement or by sequential Monte Carlo over P particles.

    python beyond/conditioning.py runs/bfn_mnist --region bottom --particles 8     # the lower half of test digits
    python beyond/conditioning.py runs/bfn_cifar --region centre --sampler sde --sample-steps 25
    python beyond/conditioning.py runs/bfn_text8 --infill "the ____ of the world" --particles 8
    python beyond/conditioning.py runs/bfn_text8 --prompt "one nine"

Writes inpaint.png and inpaint-REGION-SAMPLER-STEPS-pP.pt (the completions and the originals' classes), or
prompt.txt / infill.txt and their .pt, into the run directory; benchmarks/score_samples.py scores the .pt files. The
script's sampling flags (--sampler, --sample-steps, --num-samples, --batch-size, --seed, --device) apply.

The math of both (replacement and sequential Monte Carlo) is in beyond/smc.py.
"""

import argparse
import math
import os
import sys
import time

import numpy
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
from run_directory import open_run
from smc import (
    continuous_sample_smc,
    discrete_sample_smc,
    discretised_sample_smc,
    replace_known_probs,
    replace_known_x_hat,
)

import common

COMMAND = "conditioning.py"
REGIONS = ("top", "bottom", "left", "right", "centre")


# ----------------------------------------------------------------------------------------------------------------------
# The command: what is known, the draw, and the files.


def image_mask(region, size):
    """(H, W) bool, True where pixels are generated: a half (top, bottom, left, right), the centre (the middle half
    each way), or the white pixels of a mask image of H x W pixels."""
    half = size // 2
    quarter = size // 4
    mask = torch.zeros(size, size, dtype=torch.bool)
    if region == "top":
        mask[:half] = True
    elif region == "bottom":
        mask[half:] = True
    elif region == "left":
        mask[:, :half] = True
    elif region == "right":
        mask[:, half:] = True
    elif region == "centre":
        mask[quarter : size - quarter, quarter : size - quarter] = True
    else:
        from PIL import Image

        image = Image.open(region).convert("L")
        if image.size != (size, size):
            raise SystemExit(
                f"{COMMAND}: error: --region {region} is {image.size[0]}x{image.size[1]} pixels, not {size}"
            )
        mask = torch.from_numpy(numpy.array(image)) >= 128
    return mask


def text_known(script, cfg, args):
    """--prompt or --infill -> (L,) long: the symbols given at the start of every window, -1 where the network writes
    (each _ of --infill is one symbol: a character, or with --vocab a token; everything after the text)."""
    text = args.prompt or args.infill
    source = "--prompt" if args.prompt else "--infill"
    given = []
    for j, part in enumerate(text.split("_") if args.infill else [text]):
        if j > 0:
            given.append(-1)
        if part:  # (between two _ nothing is given)
            script.encode(part, cfg.alphabet, source)  # every character in the alphabet, or one line naming the first
            given += script.tokenize(part, cfg.alphabet, cfg.merges).tolist()
    if len(given) > cfg.seq_len:
        raise SystemExit(f"{COMMAND}: error: {source} is {len(given)} symbols, longer than --seq-len {cfg.seq_len}")
    known = torch.full((cfg.seq_len,), -1, dtype=torch.long)
    known[: len(given)] = torch.tensor(given, dtype=torch.long)
    return known


def complete(script, cfg, runtime, net, known, particles, generator):
    """Samples given known (n, ...): by replacement (particles 1) or sequential Monte Carlo, in batches."""
    kind = cfg.output if script.SCRIPT == "bfn_cifar.py" else "discrete"
    out = []
    for index in torch.arange(len(known)).split(max(1, cfg.batch_size // particles)):
        part = known[index]
        predict = script.prediction(net, cfg, runtime)
        sde = cfg.sampler == "sde"
        if particles > 1 and kind == "continuous":
            out.append(continuous_sample_smc(predict, part, cfg.sample_steps, cfg.sigma_1, particles, sde, generator))
        elif particles > 1 and kind == "discretised":
            smc = discretised_sample_smc(
                predict, part, cfg.sample_steps, cfg.sigma_1, cfg.bins, particles, sde, generator
            )
            out.append(smc)
        elif particles > 1:
            K = len(script.symbols(cfg)) if script.SCRIPT == "bfn_text8.py" else script.K
            out.append(discrete_sample_smc(predict, part, cfg.sample_steps, cfg.beta_1, K, particles, sde, generator))
        elif kind == "continuous":
            out.append(script.generate(replace_known_x_hat(predict, part), len(index), cfg, runtime, generator))
        else:
            if kind == "discretised":  # the known bins
                part = torch.where(part.isnan(), -1, common.bin_index(part.nan_to_num(), cfg.bins))
            out.append(script.generate(replace_known_probs(predict, part), len(index), cfg, runtime, generator))
    return torch.cat(out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The run's script takes the others: --sampler, --sample-steps, --num-samples, --batch-size, --seed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory of bfn_mnist.py, bfn_cifar.py or bfn_text8.py")
    parser.add_argument("--region", help="images: what to generate: top, bottom, left, right, centre or a mask image")
    parser.add_argument("--prompt", help="text: continue this text, given at the start of every window")
    parser.add_argument("--infill", help="text: fill in the underscores of this text (one symbol each)")
    parser.add_argument("--particles", type=int, default=1, help="sequential Monte Carlo over P particles (1: replace)")
    args, flags = parser.parse_known_args(argv)
    script, cfg, runtime, net = open_run(args.run_dir, flags, COMMAND, argv)
    text = script.SCRIPT == "bfn_text8.py"
    wanted = "--prompt or --infill" if text else "--region"
    if text and args.region or not text and (args.prompt or args.infill):
        raise SystemExit(f"{COMMAND}: error: {script.SCRIPT} runs take {wanted}")
    if not (args.region or args.prompt or args.infill) or (args.prompt and args.infill):
        raise SystemExit(f"{COMMAND}: error: give one of {wanted}")
    if args.region and args.region not in REGIONS and not os.path.isfile(args.region):
        raise SystemExit(
            f"{COMMAND}: error: --region takes {', '.join(REGIONS)} or a mask image; {args.region} is neither"
        )
    if args.infill is not None and "_" not in args.infill:
        raise SystemExit(f"{COMMAND}: error: --infill needs at least one _ to fill in")
    if args.particles < 1 or args.particles > 1 and cfg.sampler == "ode":
        raise SystemExit(f"{COMMAND}: error: --particles must be at least 1, and 1 with the deterministic ODE solver")
    start = time.time()
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed + 2)
    n = cfg.num_samples
    name = f"{cfg.sampler}-{cfg.sample_steps}-p{args.particles}.pt"
    if text:
        kind = "prompt" if args.prompt else "infill"
        known = text_known(script, cfg, args).to(runtime.device).expand(n, -1)
        x = complete(script, cfg, runtime, net, known, args.particles, generator)
        samples = [script.decode(row, script.symbols(cfg)) for row in x]
        how = f"{cfg.sampler}, {cfg.sample_steps} steps, {args.particles} particles"
        with open(os.path.join(cfg.out_dir, f"{kind}.txt"), "w") as f:
            f.write(f"{kind} |{args.prompt or args.infill}| ({how})\n")
            for b, sample in enumerate(samples):
                f.write(f"--- {b}\n{sample}\n")
        name = f"{kind}-{name}"
        script.save_samples(x, samples, cfg, name)
        saved = torch.load(os.path.join(cfg.out_dir, name), weights_only=True)  # the text given, for the scoring
        torch.save(saved | {kind: args.prompt or args.infill}, os.path.join(cfg.out_dir, name))
        runtime.log(f"{kind} ({time.time() - start:.0f} s): {n} completions | {kind}.txt, {name}")
        return x
    from torchvision.utils import save_image

    data = script.load_data(cfg, runtime.device)
    original = script.as_data(data["test"][:n], cfg, generator)
    size = original.shape[-1]
    missing = image_mask(args.region, size).to(runtime.device)
    if script.SCRIPT == "bfn_cifar.py":
        x = complete(script, cfg, runtime, net, torch.where(missing, float("nan"), original), args.particles, generator)
        shown = [torch.where(missing, 0.0, original), x, original]  # the missing part grey
        rows = (torch.stack(shown, 1).flatten(0, 1) + 1) / 2
    else:
        x = complete(script, cfg, runtime, net, torch.where(missing, -1, original), args.particles, generator)
        shown = [torch.where(missing, 0.5, 1 - original.float()), 1 - x.float(), 1 - original.float()]
        rows = torch.stack(shown, 1).flatten(0, 1)[:, None]  # ink black, missing grey
    save_image(rows, os.path.join(cfg.out_dir, "inpaint.png"), nrow=3 * max(1, round(math.sqrt(n) / 2)), pad_value=0.5)
    region = args.region if args.region in REGIONS else "mask"
    name = f"inpaint-{region}-{name}"
    script.save_samples(x, data["test_labels"][:n], cfg, name)
    runtime.log(
        f"inpainting ({args.region}, {time.time() - start:.0f} s): {n} test images completed | inpaint.png, {name}"
    )
    return x


if __name__ == "__main__":
    main()
