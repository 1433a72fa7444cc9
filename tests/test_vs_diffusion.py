"""benchmarks/bfn_vs_diffusion.py: the diffusion side tested like the BFN math, on toy data with an exact posterior
(the masked NELBO equals -ln p(x) for the exact conditionals; VDM's bound averages to the data's entropy), its samplers
against the distributions they should reproduce, and each data type end to end on tiny data in the real formats.

    python -m pytest -q tests/test_vs_diffusion.py
"""

import json
import math
import os
import sys

import numpy as np
import torch

from conftest import ROOT, write_cifar, write_mnist
from test_training import write_words

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bfn_vs_diffusion as V  # noqa: E402

import common  # noqa: E402

JOINT = torch.tensor([[0.30, 0.05, 0.02], [0.04, 0.20, 0.06], [0.01, 0.07, 0.25]], dtype=torch.float64)  # p(x0, x1)
MASK = 3


def exact_log_p(z, t):
    """ln p(x_l | the unmasked positions of z) of JOINT for both positions: z (B, 2), 3 where masked -> (B, 2, 3)."""
    m0, m1 = JOINT.sum(1), JOINT.sum(0)
    z0, z1 = z[:, 0].clamp(max=2), z[:, 1].clamp(max=2)
    c0 = torch.where((z[:, 1] < MASK)[:, None], JOINT[:, z1].T / m1[z1][:, None], m0)
    c1 = torch.where((z[:, 0] < MASK)[:, None], JOINT[z0] / m0[z0][:, None], m1)
    return torch.stack([c0, c1], 1).log()


def test_masked_nelbo_of_the_exact_conditionals_is_minus_ln_p():
    """With the exact conditionals the continuous-time NELBO is -ln p(x) for every x (each order of unmasking gives
    the chain rule). The expectation is exact here: the 4 masks enumerated with their probabilities t^m (1 - t)^(2-m),
    t integrated by Gauss-Legendre (the integrand is linear in t)."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    t = torch.tensor((nodes + 1) / 2)
    for x0 in range(3):
        for x1 in range(3):
            x = torch.tensor([[x0, x1]]).repeat(len(t), 1)
            nelbo = 0
            for m0 in (0, 1):
                for m1 in (0, 1):
                    z = torch.stack(
                        [torch.full_like(t, MASK if m0 else x0), torch.full_like(t, MASK if m1 else x1)], 1
                    ).long()
                    prob = (t if m0 else 1 - t) * (t if m1 else 1 - t)
                    nelbo = nelbo + prob * V.masked_loss(exact_log_p(z, t), x, z, t)
            integral = (nelbo * torch.tensor(weights / 2)).sum().item()
            assert abs(integral + math.log(JOINT[x0, x1])) < 1e-12, (x0, x1, integral)


def test_masked_nelbo_estimate_from_mask_and_stratified_t():
    """The same bound estimated as the benchmark does (mask() and stratified t): within 4 standard errors."""
    g, n = torch.Generator().manual_seed(0), 200_000
    x = torch.multinomial(JOINT.flatten(), n, replacement=True, generator=g)
    x = torch.stack([x // 3, x % 3], 1)
    t = common.training_times(n, True, g).double()
    z = V.mask(x, t, MASK, g)
    nelbo = V.masked_loss(exact_log_p(z, t), x, z, t)
    entropy = -(JOINT * JOINT.log()).sum().item()
    assert abs(nelbo.mean().item() - entropy) < 4 * nelbo.std().item() / math.sqrt(n)
    assert ((z == MASK).double().mean(1) - t).abs().mean() < 0.5  # masked with probability t


def sampled_joint(n_steps, n=40_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = V.masked_sample(exact_log_p, (n, 2), n_steps, MASK, g)
    return torch.bincount(3 * z[:, 0] + z[:, 1], minlength=9).double().view(3, 3) / n, n


def test_masked_sampler_reproduces_the_joint_and_is_exact_at_n_steps_up_to_simultaneous_reveals():
    """Each position is revealed at a step uniform over the n steps, independently, so both come out at the same step
    (drawn from the marginals, independently) with probability 1/n: the sampler's joint is exactly
    (1 - 1/n) p + (1/n) p0 p1. Checked at 5 steps, where it is measurably not p, and at 100, where it is p within
    standard errors."""
    product = JOINT.sum(1)[:, None] * JOINT.sum(0)[None, :]
    for steps in (5, 100):
        q, n = sampled_joint(steps)
        expected = (1 - 1 / steps) * JOINT + product / steps
        se = (expected * (1 - expected) / n).sqrt()
        assert ((q - expected).abs() < 4.5 * se).all(), (steps, q, expected)
        assert ((q - JOINT).abs() < 4.5 * se).all() == (steps == 100)


def three_points():
    """Data on three bin centres of 256, with probabilities 0.2, 0.3, 0.5; and the exact eps_hat of VDM's z_t."""
    c = (2 * torch.tensor([40.0, 140.0, 200.0], dtype=torch.float64) + 1) / 256 - 1
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)

    def eps_fn(z, t):  # z (B, 1)
        g = V.gamma(t.double())[:, None]
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        w = torch.log_softmax(p.log() - (z - alpha * c) ** 2 / (2 * sigma**2), -1)  # (B, 3) posterior of the point
        return (z - alpha * (w.exp() * c).sum(-1, keepdim=True)) / sigma

    return c, p, eps_fn


def test_vdm_nelbo_of_the_exact_denoiser_averages_to_the_data_entropy():
    """Averaged over the data, prior + reconstruction + diffusion loss of the exact denoiser is H(x) +
    KL(q(z_1) || N(0, 1)) + the decoder's mismatch: by I-MMSE the diffusion term is I(x; z_0) - I(x; z_1). Both extras
    are about 1e-3 nats here; the reconstruction term is 0.007 (z_0 / alpha_0 lands in a neighbouring bin when its
    noise passes 3 sigma_0 / alpha_0). A wrong weight (the 1/2, gamma') or a sign moves the sum by tenths."""
    c, p, eps_fn = three_points()
    g, n = torch.Generator().manual_seed(1), 200_000
    x = c[torch.multinomial(p, n, replacement=True, generator=g)][:, None]  # (n, 1)
    parts = V.vdm_nelbo(eps_fn, x, common.training_times(n, True, g).double(), g)
    nelbo = sum(parts.values())
    entropy = -(p * p.log()).sum().item()
    assert abs(nelbo.mean().item() - entropy) < 4 * nelbo.std().item() / math.sqrt(n) + 2e-3
    assert 1e-3 < parts["recon"].mean() < 0.02 and parts["prior"].mean() < 5e-3


def test_vdm_sampler_reproduces_a_gaussian_mixture():
    """Ancestral sampling with the exact eps_hat of a 1-D two-component Gaussian mixture: at 100 steps the mean and the
    weight below 0 match the mixture's within standard errors and the variance is 4% short (0.193 against 0.201; at 5
    steps 0.079, at 10 0.124: RESULTS.md); at 1,000 steps the variance matches too."""
    w, m, s = torch.tensor([0.3, 0.7]), torch.tensor([-0.5, 0.4]), torch.tensor([0.1, 0.2])
    w, m, s = w.double(), m.double(), s.double()

    def eps_fn(z, t):
        g = V.gamma(t.double())[:, None, None]
        alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
        var = alpha**2 * s**2 + sigma**2  # z | component k
        log_w = torch.log_softmax(w.log() - (z[..., None] - alpha * m) ** 2 / (2 * var) - var.log() / 2, -1)
        x_hat = (log_w.exp() * (m + alpha * s**2 / var * (z[..., None] - alpha * m))).sum(-1)
        return (z - alpha[..., 0] * x_hat) / sigma[..., 0]

    n, g = 20_000, torch.Generator().manual_seed(2)
    mean, var = (w * m).sum().item(), (w * (s**2 + m**2)).sum().item() - (w * m).sum().item() ** 2
    below = 0.3 + 0.7 * 0.5 * math.erfc(0.4 / 0.2 / math.sqrt(2))
    for steps in (100, 1000):
        x = V.vdm_sample(eps_fn, (n, 1), steps, g).double()[:, 0]
        assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / n)
        assert abs((x < 0).double().mean().item() - below) < 4 * math.sqrt(below * (1 - below) / n)
        se = ((x - x.mean()) ** 2).std().item() / math.sqrt(n)  # of the variance
        assert abs(x.var().item() - var) < (4 * se if steps == 1000 else 0.06 * var), (steps, x.var().item(), var)


FAST = ["--minutes", "0.01", "--eval-at", "0.005", "--calls", "3", "--num-samples", "4", "--eval-examples", "6"]


def test_each_data_type_end_to_end(tmp_path, capfd):
    """Both methods on MNIST (each in its own process), and the diffusion side of text8 and CIFAR in this one: a
    curve, a whole-test bound, scored samples, the table and the figure; the diffusion networks differ from the BFN's
    only in the input (masked diffusion) or output (VDM) layer."""
    out = str(tmp_path / "out")
    V.main(["mnist", "--data-dir", write_mnist(str(tmp_path / "mnist")), "--out-dir", out, *FAST])
    assert capfd.readouterr().out.count("| method |") == 1  # the parent's table, not its children's too
    text = str(tmp_path / "words.txt")
    write_words(tmp_path / "words.txt")
    V.main(["text8", "--text-file", text, "--out-dir", out, "--method", "diffusion", *FAST])
    V.main(
        ["cifar", "--data-dir", write_cifar(str(tmp_path / "cifar")), "--out-dir", out, "--method", "diffusion", *FAST]
    )
    runs = {
        os.path.basename(p)[:-5]: json.load(open(os.path.join(out, p))) for p in os.listdir(out) if p.endswith(".json")
    }
    assert sorted(runs) == [
        "cifar-diffusion-lr0.001",
        "mnist-bfn-lr0.001",
        "mnist-diffusion-lr0.001",
        "text8-diffusion-lr0.001",
    ]
    for r in runs.values():
        assert r["steps"] >= 1 and math.isfinite(r["test"]["total"]) and r["curve"][0]["minutes"] == 0.005
        assert r["peak_memory_mib"] > 0 and set(r["samples"]) == {"3"}
    for name in runs:  # three network calls on either side
        assert json.load(open(os.path.join(out, name, "samples-3-calls.score.json")))["network_calls"] == 3
    assert runs["mnist-bfn-lr0.001"]["parameters"] - runs["mnist-diffusion-lr0.001"]["parameters"] == -2 * 32
    assert 0 <= runs["text8-diffusion-lr0.001"]["samples"]["3"]["spelling_accuracy"] <= 1
    svg = open(os.path.join(out, "mnist.svg")).read()
    assert svg.count("<circle") == 4 and "BFN lr 0.001" in svg and "diffusion lr 0.001" in svg  # 2 curves of 2 marks
