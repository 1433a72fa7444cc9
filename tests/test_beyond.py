"""What beyond/ adds to a trained model's sampling: conditioning on known values by replacement and sequential Monte
Carlo (beyond/smc.py) and gradient guidance, with exact posteriors in place of the network (those of
tests/test_samplers.py), then each command of beyond/ end to end on a tiny run of each script.

    python -m pytest -q tests/test_beyond.py
"""

import contextlib
import math
import os
import sys
import types

import pytest
import torch

import bfn_cifar
import bfn_mnist
import bfn_text8
from conftest import ROOT, write_cifar, write_mnist
from test_samplers import (
    BETA_1,
    K16,
    M1,
    P3,
    S1,
    SIGMA_1,
    SIGMA_16,
    W1,
    binned_joint,
    bins_posterior,
    component_log_posterior,
    gen,
    histogram,
    joint_marginals,
    kl,
    mixture_x_hat,
)
from test_training import write_words

sys.path.insert(0, os.path.join(ROOT, "beyond"))
import classifier_free_guidance
import conditioning
import gradient_guidance
import smc

import common as C


def recorded(fn, trajectory):
    """fn, appending each call's t to trajectory."""

    def call(inputs, t):
        trajectory.append({"t": t[0].item()})
        return fn(inputs, t)

    return call


def recorded_inputs(fn, inputs):
    """fn, appending each call's input to the list inputs."""

    def call(theta, t):
        inputs.append(theta)
        return fn(theta, t)

    return call


# ---------------------------------------------------------------------------------------------------- known dimensions

# Two components whose x0 differ by little and x1 by much: x0 = 0.3 leaves x1 near 0.6, but the flow of x0 tells the
# two apart only late (t ≈ 1/3 at sigma_1 = 0.001), after x1 has taken a side.
W2, M2, S2 = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([[0.1, -0.6], [0.3, 0.6]]).double(), 0.05


ARGS = {"continuous": (SIGMA_1,), "discretised": (SIGMA_16, K16), "discrete": (BETA_1, 3)}  # schedule (and K)


def conditioned(kind, fn, name, known, P, n, g):
    """Sampler `name` (paper, ode, sde) of data `kind` with network function fn, conditioned on known: by replacement
    (P = 1), or by sequential Monte Carlo over P particles per example."""
    if P > 1:
        sampler = getattr(smc, f"{kind}_sample_smc")
        return sampler(fn, known, n, *ARGS[kind], P, sde=name == "sde", generator=g)
    if kind == "continuous":
        fn = smc.replace_known_x_hat(fn, known)
    else:
        k = known if kind == "discrete" else torch.where(known.isnan(), -1, C.bin_index(known.nan_to_num(), K16))
        fn = smc.replace_known_probs(fn, k)
    return getattr(C, f"{kind}_sample" + {"paper": "", "ode": "_ode", "sde": "_sde"}[name])(
        fn, known.shape, n, *ARGS[kind], generator=g
    )


def conditional_setups():
    """For each data type: (network function, sampler name -> sampler(known, particles, n, generator)), known value of
    dimension 0, and a score of samples (N, D): KL(p(x_1.. | x_0 = c) || samples)."""
    binned = binned_joint(W2, M2, S2, 20)  # the exact conditional of x1 given x0 in x0's bin, on 20 bins
    x0_bin = C.bin_index(torch.tensor(0.3), 20).item()
    continuous_truth = binned[x0_bin] / binned[x0_bin].sum()
    joint16 = binned_joint(W2, M2, S2, K16)
    k0 = C.bin_index(torch.tensor(0.3), K16).item()
    fns = {
        "continuous": mixture_x_hat(W2, M2, S2, SIGMA_1),
        "discretised": bins_posterior(joint16, SIGMA_16, K16),
        "discrete": joint_marginals(P3),
    }
    values_scores = {
        "continuous": (0.3, lambda x: kl(continuous_truth, histogram(x[:, 1], 20))),
        "discretised": (
            C.bin_centres(K16)[k0].item(),
            lambda x: kl(joint16[k0] / joint16[k0].sum(), torch.bincount(C.bin_index(x[:, 1], K16), minlength=K16)),
        ),
        "discrete": (0, lambda x: kl(P3[0] / P3[0].sum(), torch.bincount(x[:, 1] * 3 + x[:, 2], minlength=9))),
    }
    return {
        kind: (
            fn,
            {
                name: (lambda known, P, n, g, kind=kind, fn=fn, name=name: conditioned(kind, fn, name, known, P, n, g))
                for name in ("paper", "ode", "sde")
            },
            *values_scores[kind],
        )
        for kind, fn in fns.items()
    }


@pytest.mark.parametrize("kind", ["continuous", "discretised", "discrete"])
def test_replacement_keeps_the_known_values_but_smc_samples_the_conditional(kind):
    """Replacement keeps dimension 0 at its value but is biased for the others (it conditions them on noisy versions
    of the known value only); SMC with 16 particles per example samples p(x_rest | x_0) to within 0.02 nats (the
    samples' own smoothing bias included), for the paper's and the SDE sampler. The ODE takes replacement only."""
    _, samplers, value, score = conditional_setups()[kind]
    D = 3 if kind == "discrete" else 2
    N, n = 2000, 25
    known = torch.full((N, D), -1) if kind == "discrete" else torch.full((N, D), float("nan"))
    known[:, 0] = value
    for name in ("paper", "sde"):
        replaced = samplers[name](known, 1, n, gen(1))
        assert (replaced[:, 0] == value).all()
        particles = samplers[name](known, 16, n, gen(2))
        assert (particles[:, 0] == value).all() and particles.shape == known.shape
        assert score(replaced) > 0.1 and score(particles) < 0.02, (name, score(replaced), score(particles))
    assert (samplers["ode"](known, 1, n, gen(3))[:, 0] == value).all()


@pytest.mark.parametrize("kind", ["continuous", "discretised", "discrete"])
@pytest.mark.parametrize("name", ["paper", "sde"])
def test_conditioning_with_nothing_known_is_the_plain_sampler(kind, name):
    """Replacement, sequential Monte Carlo with one particle and a recorded trajectory, with nothing known, give the
    plain sampler's samples to the bit, from the same generator."""
    fn, samplers, value, _ = conditional_setups()[kind]
    shape = (50, 3) if kind == "discrete" else (50, 2)
    nothing = torch.full(shape, -1) if kind == "discrete" else torch.full(shape, float("nan"))
    plain = getattr(C, f"{kind}_sample" + ("_sde" if name == "sde" else ""))
    expected, trajectory = plain(fn, shape, 7, *ARGS[kind], generator=gen(9)), []
    assert torch.equal(conditioned(kind, fn, name, nothing, 1, 7, gen(9)), expected)
    particles = getattr(smc, f"{kind}_sample_smc")(fn, nothing, 7, *ARGS[kind], 1, sde=name == "sde", generator=gen(9))
    assert torch.equal(particles, expected)
    assert torch.equal(plain(recorded(fn, trajectory), shape, 7, *ARGS[kind], generator=gen(9)), expected)
    assert len(trajectory) == 8 and trajectory[-1]["t"] == 1.0


def test_smc_weighs_particles_by_the_distribution_it_draws_from():
    """A guided prediction off the simplex (class 2 negative, the rest not normalised) and its normalised positive
    part, which common.sample_categorical draws from alike: the paper's sampler with sequential Monte Carlo gives them
    the same weights, so the same samples from the same generator. Weighing by the raw values instead favours
    particles whose raw values sum higher."""
    fn = joint_marginals(P3)

    def raw(theta, t):
        return torch.where(torch.arange(3) == 2, -0.3, 2 * fn(theta, t))

    def positive(theta, t):
        p = raw(theta, t).clamp_min(0)
        return p / p.sum(-1, keepdim=True)

    known = torch.full((500, 3), -1)
    known[:, 0] = 0
    a, b = (smc.discrete_sample_smc(f, known, 10, *ARGS["discrete"], 8, generator=gen(3)) for f in (raw, positive))
    assert (a[:, 1:] < 2).all() and (a == b).all(-1).float().mean() > 0.99


# ---------------------------------------------------------------------------------------------------- guidance


def assert_frequencies(samples, p, z=5.0):
    """Each cell's frequency within z binomial standard errors of p."""
    f = torch.bincount(samples, minlength=len(p)).double() / len(samples)
    se = (p * (1 - p) / len(samples)).sqrt()
    assert ((f - p).abs() <= z * se + 1e-12).all(), (f, p)


def guided_discrete(w, cls):
    """probs_fn of the P3 joint guided towards the class (x0 + x1 + x2) mod 3 = cls by the exact classifier
    p(cls | theta) = sum_x [class(x) = cls] p(x | theta), its gradient by autograd."""
    codes = torch.arange(27).view(3, 3, 3)
    in_class = ((codes // 9 + codes // 3 % 3 + codes % 3) % 3 == cls).double()
    probs = joint_marginals(P3)

    def guided(theta, t):
        with torch.enable_grad():
            th = theta.detach().double().requires_grad_()
            lt = th.clamp_min(1e-300).log()
            lp = P3.log()[None] + lt[:, 0, :, None, None] + lt[:, 1, None, :, None] + lt[:, 2, None, None, :]
            log_c = torch.logsumexp(lp.flatten(1) + in_class.flatten().log(), -1) - torch.logsumexp(lp.flatten(1), -1)
            (grad,) = torch.autograd.grad(log_c.sum(), th)
        return gradient_guidance.discrete_guided_probs(probs(theta, t), theta, grad.float(), w)

    return guided, (P3 * in_class) / (P3 * in_class).sum()


@pytest.mark.parametrize("sampler", ["paper", "ode", "sde"])
def test_guidance_with_an_exact_classifier_samples_the_class(sampler):
    """Discrete data: e_hat + grad_y ln p(c | theta) is the exact posterior given c, so at w = 1 every sampler draws
    p(x | c) (the P3 joint restricted to (x0 + x1 + x2) mod 3 = 1; 200 steps, each cell within 5 standard errors; a
    large beta(1), so that the final draw of each dimension from its marginal cannot break the class);
    at w = 0 it is the unguided sampler to the bit."""
    run = {"paper": C.discrete_sample, "ode": C.discrete_sample_ode, "sde": C.discrete_sample_sde}[sampler]
    guided, target = guided_discrete(1.0, 1)
    x = run(guided, (8000, 3), 200, 20.0, 3, generator=gen(5))  # beta(1) = 20: theta(1) certain, the draw joint
    assert_frequencies(x[:, 0] * 9 + x[:, 1] * 3 + x[:, 2], target.flatten())
    unguided = run(joint_marginals(P3), (50, 3), 7, BETA_1, 3, generator=gen(6))
    assert torch.equal(run(guided_discrete(0.0, 1)[0], (50, 3), 7, BETA_1, 3, generator=gen(6)), unguided)


@pytest.mark.parametrize("sampler", ["paper", "ode", "sde"])
def test_guidance_of_continuous_data_samples_the_component(sampler):
    """Continuous data: x_hat + (1 - gamma) grad_mu ln p(c | mu) = E[x | mu, c] (Tweedie), so at w = 1 the guided
    samplers draw the component c of the mixture, N(0.6, 0.08^2) (mean and variance within 5 standard errors; 400
    steps); w = 0 is the unguided sampler to the bit."""
    run = {
        "paper": C.continuous_sample,
        "ode": lambda *a, **k: C.continuous_sample_ode(*a, order=2, **k),
        "sde": C.continuous_sample_sde,
    }[sampler]
    x_hat = mixture_x_hat(W1, M1, S1, SIGMA_1)

    def guided(w):
        def fn(mu, t):
            with torch.enable_grad():
                m = mu.detach().requires_grad_()
                log_c = component_log_posterior(m, t, W1, M1, S1, SIGMA_1).log_softmax(-1)[:, 1]
                (grad,) = torch.autograd.grad(log_c.sum(), m)
            return gradient_guidance.continuous_guided_x_hat(x_hat(mu, t), t, grad, w, SIGMA_1)

        return fn

    x = run(guided(1.0), (20_000, 1), 400, SIGMA_1, generator=gen(7)).double()
    n, m, s = len(x), M1[1, 0].item(), S1
    assert abs(x.mean().item() - m) < 5 * s / math.sqrt(n)
    assert abs(x.var().item() - s**2) < 5 * s**2 * math.sqrt(2 / (n - 1))
    plain = run(x_hat, (50, 1), 7, SIGMA_1, generator=gen(8))
    assert torch.equal(run(guided(0.0), (50, 1), 7, SIGMA_1, generator=gen(8)), plain)


def conditional_table(kind, n=25, examples=2000, particles=(1, 2, 4, 8, 16, 32)):
    """For RESULTS.md: KL(p(x_rest | x_0) || samples) of the paper's and the SDE sampler with each number of particles
    (1: replacement), the ODE solver (replacement), and a network told x_0 (the exact posterior given it, sampled over
    the other dimensions alone)."""
    _, samplers, value, score = conditional_setups()[kind]
    D = 3 if kind == "discrete" else 2
    known = torch.full((examples, D), -1) if kind == "discrete" else torch.full((examples, D), float("nan"))
    known[:, 0] = value
    rows = {(name, P): score(samplers[name](known, P, n, gen(P))) for name in ("paper", "sde") for P in particles}
    rows["ode", 1] = score(samplers["ode"](known, 1, n, gen(0)))

    def told(name, g):  # the other dimensions, sampled from their exact posterior given x_0
        if kind == "continuous":  # the mixture given x0: the components' weights times their density at x0
            weights = W2 * torch.exp(-((value - M2[:, 0]) ** 2) / (2 * S2**2))
            fn = mixture_x_hat(weights / weights.sum(), M2[:, 1:], S2, SIGMA_1)
            sampler = {"paper": C.continuous_sample, "sde": C.continuous_sample_sde}[name]
            return sampler(fn, (examples, 1), n, SIGMA_1, g)
        if kind == "discretised":
            joint = binned_joint(W2, M2, S2, K16)[C.bin_index(torch.tensor(value), K16)]
            fn = bins_posterior(joint / joint.sum(), SIGMA_16, K16)
            sampler = {"paper": C.discretised_sample, "sde": C.discretised_sample_sde}[name]
            return sampler(fn, (examples, 1), n, SIGMA_16, K16, g)
        sampler = {"paper": C.discrete_sample, "sde": C.discrete_sample_sde}[name]
        return sampler(joint_marginals(P3[0] / P3[0].sum()), (examples, 2), n, BETA_1, 3, g)

    for name in ("paper", "sde"):
        rest = told(name, gen(99))
        rows[name, "told"] = score(torch.cat([torch.full((examples, 1), value).to(rest.dtype), rest], 1))
    return rows


# ----------------------------------------------------------------------------------------- classifier-free guidance


@pytest.mark.parametrize("sampler", [C.discrete_sample_ode, C.discrete_sample_sde])
def test_guidance_on_probabilities_is_guidance_on_the_updates_of_theta(sampler):
    """The ODE and SDE samplers use p_O only through the mean of the update of the logits, so running them with
    (1 + w) p_c - w p_u gives ln theta = (1 + w) ln theta_c - w ln theta_u (up to normalisation) for the same noise:
    classifier-free guidance on the input parameters."""
    g = torch.Generator().manual_seed(5)
    p_c, p_u = torch.rand(3, 4, 5, generator=g).softmax(-1), torch.rand(3, 4, 5, generator=g).softmax(-1)
    w = 1.5

    def final_theta(p):
        trajectory = []
        sampler(recorded_inputs(lambda theta, t: p, trajectory), (3, 4), 6, 2.0, 5, generator=gen(0))
        return trajectory[-1].double()

    combined = ((1 + w) * final_theta(p_c).log() - w * final_theta(p_u).log()).log_softmax(-1)
    torch.testing.assert_close(final_theta((1 + w) * p_c - w * p_u).log(), combined, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- the commands


NET = {"mnist": ["--channels", "8", "--res-blocks", "1"], "cifar": ["--channels", "8", "--res-blocks", "1"]}
TINY = ["--batch-size", "4", "--eval-examples", "4", "--eval-n", "inf", "--sample-steps", "3", "--num-samples", "4"]
TEXT = ["--layers", "2", "--heads", "2", "--width", "16", "--seq-len", "32", *TINY, "--num-samples", "3"]


def trained(tmp_path, kind, *extra):
    """A run directory of one step of a tiny network on tiny data of the script `kind`."""
    out = str(tmp_path / f"{kind}-run")
    if kind == "text8":
        bfn_text8.main(["--text-file", write_words(tmp_path / "words.txt"), *TEXT, "--out-dir", out, "--steps", "1"])
        return out
    module, writer = (bfn_mnist, write_mnist) if kind == "mnist" else (bfn_cifar, write_cifar)
    module.main(["--data-dir", writer(str(tmp_path / "data")), *NET[kind], *TINY, "--out-dir", out, "--steps", "1"] +
                list(extra))  # fmt: skip
    return out


def test_inpainting_keeps_the_known_pixels_and_smc_runs(tmp_path):
    """MNIST: the bottom half generated, the top kept, by replacement with every sampler and by SMC with the stochastic
    ones; a mask image; mistakes in one line each."""
    out = trained(tmp_path, "mnist")
    originals = None
    for sampler, particles in (("paper", 1), ("ode", 1), ("sde", 1), ("paper", 3), ("sde", 2)):
        x = conditioning.main([out, "--region", "bottom", "--particles", str(particles), "--sampler", sampler])
        saved = torch.load(os.path.join(out, f"inpaint-bottom-{sampler}-3-p{particles}.pt"), weights_only=True)
        assert torch.equal(saved["samples"], x.to(torch.uint8)) and len(saved["labels"]) == 4
        if originals is not None:
            assert torch.equal(x[:, :14], originals)  # the known top half, whatever the sampler
        originals = x[:, :14]
    assert "inpainting (bottom, " in open(os.path.join(out, "log.txt")).read()
    from PIL import Image

    Image.new("L", (28, 28), 0).save(tmp_path / "mask.png")  # nothing to generate: the binarised test images
    Image.new("L", (20, 20), 0).save(tmp_path / "small.png")
    assert torch.equal(conditioning.main([out, "--region", str(tmp_path / "mask.png")])[:, :14], originals)
    for argv, message in [
        ([out, "--region", str(tmp_path / "small.png")], "is 20x20 pixels, not 28"),
        ([out, "--region", "middle"], "--region takes top, bottom, left, right, centre or a mask image"),
        ([out, "--region", "top", "--particles", "2", "--sampler", "ode"], "1 with the deterministic ODE solver"),
        ([out, "--prompt", "the"], "bfn_mnist.py runs take --region"),
        ([str(tmp_path / "nowhere")], "nowhere/ckpt.pt does not exist"),
    ]:
        with pytest.raises(SystemExit, match=message):
            conditioning.main(argv)


@pytest.mark.parametrize("output", ["continuous", "discretised"])
def test_cifar_inpainting_keeps_the_known_half(tmp_path, output):
    out = trained(tmp_path, "cifar", "--output", output, "--bins", "16")
    for particles in (1, 2):
        x = conditioning.main([out, "--region", "left", "--particles", str(particles)])
        cfg = bfn_cifar.prepare(["--out-dir", out, "--sample-only"])[0]
        original = bfn_cifar.as_data(bfn_cifar.load_cifar(cfg.data_dir)["test"][0][:4], cfg)
        torch.testing.assert_close(x[..., 16:], original[..., 16:])  # the right half was given


@pytest.mark.parametrize("sampler", ["paper", "ode", "sde"])
def test_prompt_and_infill_keep_the_given_text(tmp_path, sampler):
    out = trained(tmp_path, "text8")
    conditioning.main([out, "--prompt", "the bayesian", "--sampler", sampler])
    lines = open(os.path.join(out, "prompt.txt")).read().splitlines()
    assert lines[0].startswith("prompt |the bayesian|") and all(line.startswith("the bayesian") for line in lines[2::2])
    conditioning.main([out, "--infill", "the ____ of flow", "--sampler", sampler])
    lines = open(os.path.join(out, "infill.txt")).read().splitlines()
    assert all(line[:4] == "the " and line[8:16] == " of flow" for line in lines[2::2])
    saved = torch.load(os.path.join(out, f"infill-{sampler}-3-p1.pt"), weights_only=True)
    assert saved["texts"] == lines[2::2] and saved["infill"] == "the ____ of flow"
    if sampler != "ode":  # sequential Monte Carlo
        conditioning.main([out, "--prompt", "the flow", "--particles", "3", "--sampler", sampler])
        lines = open(os.path.join(out, "prompt.txt")).read().splitlines()
        assert "3 particles" in lines[0] and all(line.startswith("the flow") for line in lines[2::2])
    for argv, message in [
        ([out, "--prompt", "The"], "--prompt has the character 'T' at position 0, not in the alphabet"),
        ([out, "--infill", "the cat"], "--infill needs at least one _ to fill in"),
        ([out, "--prompt", "a", "--infill", "_"], "give one of --prompt or --infill"),
        ([out, "--prompt", "x" * 40], "--prompt is 40 symbols, longer than --seq-len 32"),
    ]:
        with pytest.raises(SystemExit, match=message):
            conditioning.main(argv)


def test_gradient_guidance_of_images_trains_its_classifier_once(tmp_path):
    """MNIST: the guide classifier trained on first use and kept in the run directory, then each sampler guided
    towards the classes asked, a row each; CIFAR's continuous and discretised outputs too."""
    out = trained(tmp_path, "mnist")
    for sampler in ("paper", "ode", "sde"):
        gradient_guidance.main([out, "--weight", "2", "--class", "4", "7", "--sampler", sampler])
        saved = torch.load(os.path.join(out, f"guided-{sampler}-3-w2.pt"), weights_only=True)
        assert saved["labels"].tolist() == [4, 4, 7, 7] and saved["samples"].shape == (4, 28, 28)
    log = open(os.path.join(out, "log.txt")).read()
    assert log.count("training the guide classifier") == 1 and os.path.exists(os.path.join(out, "guide.pt"))
    with pytest.raises(SystemExit, match="--class takes the classes of the run"):
        gradient_guidance.main([out, "--weight", "2", "--class", "10"])
    for output in ("continuous", "discretised"):
        run = trained(tmp_path / output, "cifar", "--output", output, "--bins", "16")
        x = gradient_guidance.main([run, "--weight", "1", "--class", "3", "--sampler", "sde"])
        assert x.shape == (4, 3, 32, 32) and x.abs().max() <= 1


def test_gradient_guidance_of_text_towards_a_word(tmp_path):
    out = trained(tmp_path, "text8")
    for sampler in ("paper", "ode", "sde"):
        gradient_guidance.main([out, "--word", "flow", "--weight", "3", "--sampler", sampler])
        saved = torch.load(os.path.join(out, f"guided-{sampler}-3-w3.pt"), weights_only=True)
        assert saved["guide_word"] == "flow" and len(saved["texts"]) == 3
    with pytest.raises(SystemExit, match="bfn_text8.py runs take --word"):
        gradient_guidance.main([out, "--weight", "3", "--class", "1"])


def test_classifier_free_guidance_is_the_formula():
    """A stand-in network whose logit of black is its label / 4: guidance w combines the label-7 and null-label (10)
    predictions linearly, (1 + w) p_O(. | 7) - w p_O(. | null), from one call on both batches."""
    calls = []

    def net(x, t, labels):
        calls.append(len(x))
        return labels.float()[:, None, None].expand_as(x) / 4

    cfg = bfn_mnist.Config(conditional=True)
    runtime = types.SimpleNamespace(autocast=contextlib.nullcontext())
    predict = classifier_free_guidance.guided(bfn_mnist, cfg, runtime, net, torch.tensor([7, 7]), 1.5)
    probs = predict(torch.full((2, 28, 28, 2), 0.5), torch.zeros(2))
    expected = 2.5 * torch.sigmoid(torch.tensor(7 / 4)) - 1.5 * torch.sigmoid(torch.tensor(10 / 4))
    torch.testing.assert_close(probs[..., 1], expected.expand(2, 28, 28))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 28, 28))
    assert calls == [4]


def test_classifier_free_guidance_of_a_conditional_run(tmp_path):
    """A conditional run directory is sampled with guidance without retyping --conditional, a row per class asked;
    an unconditional one is refused in one line."""
    out = trained(tmp_path, "mnist", "--conditional", "--channels", "32")
    for sampler in ("paper", "sde"):
        classifier_free_guidance.main([out, "--weight", "2", "--class", "3", "5", "--sampler", sampler])
        saved = torch.load(os.path.join(out, f"cf-guided-{sampler}-3-w2.pt"), weights_only=True)
        assert saved["labels"].tolist() == [3, 3, 5, 5]
    with pytest.raises(SystemExit, match="is not a --conditional model"):
        classifier_free_guidance.main([trained(tmp_path / "plain", "mnist"), "--weight", "1"])
