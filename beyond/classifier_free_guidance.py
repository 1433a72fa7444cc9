"""Classifier-free guidance of a class-conditional BFN (Ho and Salimans, arXiv:2207.12598), beyond the paper: sample
each requested class with the prediction pushed away from the unconditional one by a weight w.

    python bfn_mnist.py --preset quick --conditional --out-dir runs/cond          # train a conditional model, then
    python beyond/classifier_free_guidance.py runs/cond --weight 1 --class 4 2    # a row of fours, a row of twos
    python beyond/classifier_free_guidance.py runs/cifar_cond --weight 2 --sampler sde --sample-steps 25

The conditional scripts train one network for p(x | class) and p(x), the label replaced by a null label one time in
ten. Guidance predicts (1 + w) p_O(. | class) - w p_O(. | null) (or the same of x_hat, clipped to [-1, 1]) from one
network call on both halves of a batch; the ODE and SDE solvers use it only in the mean update of the input
parameters, and the paper's samplers draw from its positive part. w = 0 is the conditional model alone. Writes
cf-guided.png (a row per class) and cf-guided-SAMPLER-STEPS-wW.pt for benchmarks/score_samples.py; the script's
sampling flags apply.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
from run_directory import class_labels, open_run, save_images

import common

COMMAND = "classifier_free_guidance.py"


def guided(script, cfg, runtime, net, labels, w):
    """The samplers' network function for labels (B,) with guidance weight w: MNIST p_O, CIFAR x_hat or p_O."""
    null = torch.full_like(
        labels, 10 ** getattr(cfg, "digits", 1)
    )  # the null label: 10 digits, 100 numbers, 10 classes
    both = torch.cat([labels, null])

    def predict_mnist(theta, t):
        log_probs = script.output_log_probs(net, theta.repeat(2, 1, 1, 1), t.repeat(2), runtime, both)
        conditional, unconditional = log_probs.exp().chunk(2)
        return (1 + w) * conditional - w * unconditional

    def predict_cifar(mu, t):
        out = script.output(net, mu.repeat(2, 1, 1, 1), t.repeat(2), cfg, runtime, both)
        if cfg.output == "continuous":
            conditional, unconditional = out.chunk(2)
            return ((1 + w) * conditional - w * unconditional).clamp(-1, 1)
        conditional, unconditional = common.discretised_probs(*out, cfg.bins).chunk(2)
        return (1 + w) * conditional - w * unconditional

    return predict_mnist if script.SCRIPT == "bfn_mnist.py" else predict_cifar


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The run's script takes the others: --sampler, --sample-steps, --num-samples, --batch-size, --seed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory of bfn_mnist.py or bfn_cifar.py trained with --conditional")
    parser.add_argument("--weight", type=float, required=True, help="the guidance weight w (0: the conditional model)")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", help="the classes to sample (default: all)")
    args, flags = parser.parse_known_args(argv)
    script, cfg, runtime, net = open_run(args.run_dir, flags, COMMAND, argv)
    if not getattr(cfg, "conditional", False):
        raise SystemExit(f"{COMMAND}: error: {args.run_dir} is not a --conditional model; train one with --conditional")
    classes_there = 10 ** getattr(cfg, "digits", 1)
    classes = args.classes or list(range(classes_there))
    if min(classes) < 0 or max(classes) >= classes_there:
        raise SystemExit(f"{COMMAND}: error: --class takes 0..{classes_there - 1}, got {' '.join(map(str, classes))}")
    if not args.weight >= -1:
        raise SystemExit(f"{COMMAND}: error: --weight must be at least -1 (the unconditional model), got {args.weight}")
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    labels, each = class_labels(classes, cfg.num_samples, runtime.device)
    batches = []
    for index in torch.arange(len(labels)).split(cfg.batch_size):
        predict = guided(script, cfg, runtime, net, labels[index], args.weight)
        batches.append(script.generate(predict, len(index), cfg, runtime, generator))
    x = torch.cat(batches)
    name = f"cf-guided-{cfg.sampler}-{cfg.sample_steps}-w{args.weight:g}.pt"
    save_images(script, x, os.path.join(cfg.out_dir, "cf-guided.png"), each)
    script.save_samples(x, labels, cfg, name)
    runtime.log(
        f"{len(x)} samples of classes {' '.join(map(str, classes))}, w = {args.weight:g}: cf-guided.png, {name}"
    )
    return x


if __name__ == "__main__":
    main()
