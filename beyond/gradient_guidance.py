"""Gradient guidance of a trained BFN, beyond the paper: steer an unconditional model towards a class of images,
through a classifier of the input parameters, or towards text that contains a word, through the network itself.

    python beyond/gradient_guidance.py runs/bfn_mnist --weight 6 --class 3          # a row of threes
    python beyond/gradient_guidance.py runs/bfn_cifar --weight 2 --sampler sde --sample-steps 25   # a row per class
    python beyond/gradient_guidance.py runs/bfn_text8 --weight 4 --word zero

Images need a classifier of the flow's input parameters and t (theta for MNIST, mu for CIFAR): the first use trains
one on the run's training images (2 epochs; it says so, and how long it took) and keeps it as guide.pt in the run
directory; --train-guide trains it again. Writes guided.png (a row per class) or guided.txt, and guided-SAMPLER-STEPS-
wW.pt (the samples with their classes or word) for benchmarks/score_samples.py. The script's sampling flags apply.

Why it works. For discrete data the flow's logits y (theta = softmax y) have p(y | x) ∝ exp(y_x) (§6.3: ln N(y |
beta (K e_x - 1), beta K I) = y_x + terms free of x), and the network predicts e_hat = E[e_x | y]. For any property c
of x (a class, a word) with p(c | y) = sum_x p(c | x) p(x | y), differentiating gives
    grad_y ln p(c | y) = E[e_x | y, c] - e_hat,
so the prediction of the model conditioned on c is e_hat + grad_y ln p(c | y), exactly, at every t. For continuous and
discretised data, mu = gamma x + sqrt(gamma (1 - gamma)) z gives in the same way (Tweedie's formula)
    x_hat + (1 - gamma) grad_mu ln p(c | mu) = E[x | mu, c].
In the SDE view of the samplers the prediction is an affine function of the score of the input parameters'
distribution, and these are that score plus grad ln p(c | .): guidance with weight w adds w times the term, in every
sampler, through the network function it is given. w = 0 is the unguided sampler; w = 1 with an exact classifier makes
every prediction the exact one given c (the samples follow p(x | c) when the last input theta(1) is certain enough,
since the final draw of p_O(. | theta, 1) is per dimension); w > 1 sharpens. A guided e_hat can leave the simplex (it
still sums to 1): the ODE and SDE solvers use it only in their mean update, and the paper's sampler draws a class from
its positive part; a guided x_hat is clipped to [-1, 1].
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
from run_directory import class_labels, open_run, save_images

import common

COMMAND = "gradient_guidance.py"


def discrete_guided_probs(probs, theta, grad_theta, w):
    """e_hat + w grad_y ln c: probs (B, ..., K) = e_hat; grad_theta = grad_theta ln c(theta, t) at the input theta; with
    theta = softmax(y), grad_y = theta (grad_theta - <theta, grad_theta>). Returns (B, ..., K), summing to 1."""
    grad_theta = grad_theta.float()
    return probs + w * theta * (grad_theta - (theta * grad_theta).sum(-1, keepdim=True))


def continuous_guided_x_hat(x_hat, t, grad_mu, w, sigma_1):
    """x_hat + w (1 - gamma(t)) grad_mu ln c(mu, t), clipped to [-1, 1]. x_hat, grad_mu (B, ...), t (B,)."""
    one_minus_gamma = common.continuous_one_minus_gamma(t, sigma_1).view(-1, *[1] * (x_hat.dim() - 1))
    return (x_hat + w * one_minus_gamma * grad_mu.float()).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------------
# Images: a classifier of the input parameters and t.


def guide_input(script, inputs, t):
    """What the classifier sees: MNIST [2 theta_black - 1, 2 t - 1] per pixel (B, H, W, 2) -> (B, 2, H, W); CIFAR mu
    and 2 t - 1 as a fourth channel, (B, 3, H, W) -> (B, 4, H, W)."""
    if script.SCRIPT == "bfn_mnist.py":
        theta_black = inputs[..., 1]
        return torch.stack([2 * theta_black - 1, (2 * t - 1)[:, None, None].expand_as(theta_black)], 1)
    return torch.cat([inputs, (2 * t - 1)[:, None, None, None].expand(-1, 1, *inputs.shape[2:])], 1)


def make_classifier(script, cfg):
    """A small CNN: (B, 2 or 4, H, W) -> (B, classes) logits (10 digits, 100 numbers, or 10 CIFAR classes)."""
    channels = 2 if script.SCRIPT == "bfn_mnist.py" else 4
    classes = 10 ** getattr(cfg, "digits", 1)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(8),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def train_guide(script, cfg, runtime, path, epochs=2, batch=128):
    """Train the classifier on the flow of the run's training images at random t (Adam), and save it to path."""
    with torch.random.fork_rng(devices=[]):  # its initial weights from the run's seed; the global generator untouched
        torch.manual_seed(cfg.seed)
        classifier = make_classifier(script, cfg).to(runtime.device)
    data = script.load_data(cfg, runtime.device)
    images = data["train"]
    labels = data["train_labels"].long()
    batches = epochs * math.ceil(len(images) / batch)
    runtime.log(f"training the guide classifier: {epochs} epochs of {len(images):,} training images, {batches} batches")
    start = time.time()
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    optimizer = torch.optim.Adam(classifier.parameters())
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator, device=runtime.device).split(batch):
            x = script.as_data(images[index], cfg, generator)
            t = torch.rand(len(x), generator=generator, device=x.device)
            if script.SCRIPT == "bfn_mnist.py":
                inputs = common.discrete_flow(x, t, cfg.beta_1, script.K, generator)
            else:
                inputs = common.continuous_flow(x, t, cfg.sigma_1, generator)
            loss = F.cross_entropy(classifier(guide_input(script, inputs, t)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    torch.save(classifier.state_dict(), path)
    runtime.log(f"the guide classifier trained in {time.time() - start:.0f} s: {path}")
    return classifier.eval()


def guided_images(script, cfg, runtime, net, classifier, labels, w):
    """The samplers' network function, guided towards labels (B,): MNIST p_O, CIFAR x_hat or p_O over the bins."""

    def grad_log_c(inputs, t):  # grad ln c(labels | inputs, t)
        with torch.enable_grad():
            inputs = inputs.detach().requires_grad_()
            log_c = classifier(guide_input(script, inputs, t)).log_softmax(-1).gather(1, labels[:, None]).sum()
            return torch.autograd.grad(log_c, inputs)[0]

    def predict_mnist(theta, t):
        probs = script.output_log_probs(net, theta, t, runtime).exp()
        return discrete_guided_probs(probs, theta, grad_log_c(theta, t), w)

    def predict_cifar(mu, t):
        out = script.output(net, mu, t, cfg, runtime)
        if cfg.output == "continuous":
            return continuous_guided_x_hat(out, t, grad_log_c(mu, t), w, cfg.sigma_1)
        mu_x, sigma_x = out  # the mean of the discretised Gaussian shifted as x_hat would be
        shifted = continuous_guided_x_hat(mu_x, t, grad_log_c(mu, t), w, cfg.sigma_1)
        return common.discretised_probs(shifted, sigma_x, cfg.bins)

    return predict_mnist if script.SCRIPT == "bfn_mnist.py" else predict_cifar


# ----------------------------------------------------------------------------------------------------------------------
# Text: the probability under the network's own output that a window spells the word.


def guided_text(script, cfg, runtime, net, word, w):
    """p_O + w grad_y ln c(theta, t), c the probability under p_O, its positions taken as independent, that the window
    spells the word (its symbols), summed over where it starts; the gradient goes back through the network to theta,
    one backward pass per step."""

    def predict(theta, t):
        with torch.enable_grad():
            theta_in = theta.detach().requires_grad_()
            log_p = script.output_log_probs(net, theta_in, t, runtime)  # (B, L, K)
            starts = log_p.shape[1] - len(word) + 1
            spelled = sum(log_p[:, j : starts + j, k] for j, k in enumerate(word))  # (B, starts)
            grad = torch.autograd.grad(torch.logsumexp(spelled, -1).sum(), theta_in)[0]
        return discrete_guided_probs(log_p.detach().exp(), theta, grad, w)

    return predict


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The run's script takes the others: --sampler, --sample-steps, --num-samples, --batch-size, --seed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", help="a run directory of bfn_mnist.py, bfn_cifar.py or bfn_text8.py")
    parser.add_argument("--weight", type=float, required=True, help="the guidance weight w (0: none)")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", help="images: the classes (default: all)")
    parser.add_argument("--word", help="text: the word the samples should contain (' zero' for after a space)")
    parser.add_argument("--train-guide", action="store_true", help="images: train the classifier again")
    args, flags = parser.parse_known_args(argv)
    script, cfg, runtime, net = open_run(args.run_dir, flags, COMMAND, argv)
    text = script.SCRIPT == "bfn_text8.py"
    if not args.weight >= 0:
        raise SystemExit(f"{COMMAND}: error: --weight must be at least 0, got {args.weight}")
    if text != bool(args.word) or text and args.classes:
        raise SystemExit(f"{COMMAND}: error: {script.SCRIPT} runs take {'--word' if text else '--class'}")
    generator = torch.Generator(runtime.device).manual_seed(cfg.seed)
    name = f"guided-{cfg.sampler}-{cfg.sample_steps}-w{args.weight:g}.pt"
    if text:
        script.encode(
            args.word, cfg.alphabet, "--word"
        )  # every character in the alphabet, or one line naming the first
        word = script.tokenize(args.word, cfg.alphabet, cfg.merges).tolist()
        if len(word) > cfg.seq_len:
            raise SystemExit(f"{COMMAND}: error: --word is longer than --seq-len {cfg.seq_len}")
        batches = []
        for index in torch.arange(cfg.num_samples).split(cfg.batch_size):
            predict = guided_text(script, cfg, runtime, net, word, args.weight)
            batches.append(script.generate(predict, len(index), cfg, runtime, generator))
        x = torch.cat(batches)
        texts = [script.decode(row, script.symbols(cfg)) for row in x]
        with open(os.path.join(cfg.out_dir, "guided.txt"), "w") as f:
            for b, sample in enumerate(texts):
                f.write(f"--- {b} (towards {args.word!r}, w = {args.weight:g})\n{sample}\n")
        script.save_samples(x, texts, cfg, name)
        saved = torch.load(os.path.join(cfg.out_dir, name), weights_only=True)  # the word, for the scoring
        torch.save(saved | {"guide_word": args.word}, os.path.join(cfg.out_dir, name))
        share = sum(args.word in sample for sample in texts) / len(texts)
        runtime.log(f"{len(texts)} samples towards {args.word!r} ({share:.0%} contain it): guided.txt, {name}")
        return x
    classes = args.classes or list(range(10 ** getattr(cfg, "digits", 1)))
    if min(classes) < 0 or max(classes) >= 10 ** getattr(cfg, "digits", 1):
        raise SystemExit(f"{COMMAND}: error: --class takes the classes of the run, got {' '.join(map(str, classes))}")
    path = os.path.join(cfg.out_dir, "guide.pt")
    if args.train_guide or not os.path.exists(path):
        classifier = train_guide(script, cfg, runtime, path)
    else:
        classifier = make_classifier(script, cfg).to(runtime.device).eval()
        classifier.load_state_dict(torch.load(path, map_location=runtime.device, weights_only=True))
    labels, each = class_labels(classes, cfg.num_samples, runtime.device)
    batches = []
    for index in torch.arange(len(labels)).split(cfg.batch_size):
        predict = guided_images(script, cfg, runtime, net, classifier, labels[index], args.weight)
        batches.append(script.generate(predict, len(index), cfg, runtime, generator))
    x = torch.cat(batches)
    save_images(script, x, os.path.join(cfg.out_dir, "guided.png"), each)
    script.save_samples(x, labels, cfg, name)
    runtime.log(f"{len(x)} samples towards classes {' '.join(map(str, classes))}: guided.png, {name}")
    return x


if __name__ == "__main__":
    main()
