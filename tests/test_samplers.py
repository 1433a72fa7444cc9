"""The samplers of common.py with exact posteriors in place of the network, on data where few steps matter: a
non-zero-mean Gaussian mixture at sigma_1 = 0.001, its 16-bin version, a correlated joint over 3 dimensions of 3
classes. Few-step accuracy, conditioning on known dimensions (replacement and SMC), and guidance.

    python -m pytest -q tests/test_samplers.py

Divergences are KL(data || samples) over bins, with half a count added to every bin of the samples.
"""
import math

import pytest
import torch

import common as C

SIGMA_1, SIGMA_16, K16, BETA_1 = 0.001, math.sqrt(0.001), 16, 3.0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------- exact posteriors

def component_log_posterior(mu, t, weights, means, s, sigma_1):
    """ln p(component | mu, t) up to a constant (the exact classifier of the component), for x a mixture of isotropic
    Gaussians N(means[c], s^2 I): given component c, mu_d ~ N(gamma m_cd, gamma^2 s^2 + gamma (1 - gamma)).
    mu (B, D) -> (B, M)."""
    g, var = _gamma_var(mu, t, sigma_1, s)
    return weights.log() - 0.5 * ((mu.double()[:, None] - g[..., None] * means) ** 2 / var[..., None]).sum(-1)


def mixture_x_hat(weights, means, s, sigma_1, component=None):
    """E[x | mu, t] (B, D) for that mixture; with component (B,), E[x | mu, t, component]."""
    def x_hat(mu, t):
        g, var = _gamma_var(mu, t, sigma_1, s)
        post = component_log_posterior(mu, t, weights, means, s, sigma_1).softmax(-1) if component is None else \
            torch.nn.functional.one_hot(component, len(weights)).double()
        within = means + g[..., None] * s ** 2 * (mu.double()[:, None] - g[..., None] * means) / var[..., None]
        return (post[..., None] * within).sum(1).float()
    return x_hat


def _gamma_var(mu, t, sigma_1, s):
    t = t.double()[:, None]
    g = -torch.expm1(2 * t * math.log(sigma_1))
    return g, (g ** 2 * s ** 2 + g * sigma_1 ** (2 * t)).clamp_min(1e-30)  # (B, 1)


W1, M1, S1 = torch.tensor([0.2, 0.8], dtype=torch.float64), torch.tensor([[-0.5], [0.6]], dtype=torch.float64), 0.08


def mixture_bin_probs(weights, means, s, K):
    """The probability of each of K bins per dimension of each component, (M, D, K), from the normal CDF; the tails go
    into the first and last bins, as data would be clipped."""
    edges = torch.linspace(-1, 1, K + 1, dtype=torch.float64)
    cdf = 0.5 * (1 + torch.erf((edges - means[..., None]) / (s * math.sqrt(2))))
    cdf[..., 0], cdf[..., -1] = 0, 1
    return cdf[..., 1:] - cdf[..., :-1]


def binned_joint(weights, means, s, K):
    """The mixture binned to K bins per dimension: a joint (K,) * D."""
    bins = mixture_bin_probs(weights, means, s, K)  # (M, D, K)
    joint = 0
    for m in range(len(weights)):
        part = weights[m]
        for d in range(means.shape[1]):
            part = part[..., None] * bins[m, d]
        joint = joint + part
    return joint


def enumerated_marginals(joint, log_like):
    """The marginals per dimension of p(x | .) ∝ p(x) prod_d like_d(x_d), by enumeration: joint (K,) * D, log_like
    (B, D, K) -> (B, D, K)."""
    B, D, K = log_like.shape
    lp = joint.log()[None]
    for d in range(D):
        lp = lp + log_like[:, d].reshape(B, *[K if e == d else 1 for e in range(D)])
    post = lp.flatten(1).softmax(-1).view(lp.shape)
    others = [[1 + e for e in range(D) if e != d] for d in range(D)]
    return torch.stack([post.sum(dims) if dims else post for dims in others], 1)


def bins_posterior(joint, sigma_1, K):
    """p_O(k | mu, t) per dimension for data on bin centres with the given joint: the likelihood of bin k given mu_d is
    N(mu_d | gamma k_c, gamma (1 - gamma)) (§5). mu (B, D) -> (B, D, K)."""
    centres = C.bin_centres(K).double()

    def probs(mu, t):
        t = t.double()[:, None, None]
        g = -torch.expm1(2 * t * math.log(sigma_1))
        variance = (g * sigma_1 ** (2 * t)).clamp_min(1e-30)
        return enumerated_marginals(joint, -(mu.double()[..., None] - g * centres) ** 2 / (2 * variance)).float()
    return probs


P3 = torch.randn(27, generator=gen(3), dtype=torch.float64).mul(2.5).softmax(0).view(3, 3, 3)  # a correlated joint


def joint_marginals(joint):
    """p_O(k | theta) per dimension for discrete data with the given joint: p(x | theta) ∝ p(x) prod_d theta_d[x_d]
    (§6.3: the flow's likelihood of x is prod_d theta_d[x_d] up to a constant). theta (B, D, K) -> (B, D, K)."""
    return lambda theta, t: enumerated_marginals(joint, theta.double().clamp_min(1e-300).log()).float()


def kl(p, counts):
    """KL(p || counts, with half a count added to each bin)."""
    q = (counts.double() + 0.5) / (counts.sum() + 0.5 * counts.numel())
    p = p.double().flatten()
    return (p * (p / q.flatten()).clamp_min(1e-300).log()).sum().item()


def histogram(x, bins=40):
    return torch.histc(x.double().clamp(-1, 1 - 1e-9), bins=bins, min=-1, max=1)





# ---------------------------------------------------------------------------------------------------- few steps

STEPS = (5, 10, 25, 200)


def few_step_table(kind):
    """KL(data || samples) of every sampler at each of STEPS steps."""
    table = {}
    if kind == "continuous":
        x_hat, truth = mixture_x_hat(W1, M1, S1, SIGMA_1), binned_joint(W1, M1, S1, 40)
        runs = {"paper": lambda n, g: C.continuous_sample(x_hat, (40_000, 1), n, SIGMA_1, g),
                "ode1": lambda n, g: C.continuous_sample_ode(x_hat, (40_000, 1), n, SIGMA_1, 1, g),
                "ode2": lambda n, g: C.continuous_sample_ode(x_hat, (40_000, 1), n, SIGMA_1, 2, g),
                "sde": lambda n, g: C.continuous_sample_sde(x_hat, (40_000, 1), n, SIGMA_1, g)}
        score = lambda x: kl(truth, histogram(x))  # noqa: E731
    elif kind == "discretised":
        truth = binned_joint(W1, M1, S1, K16)
        probs = bins_posterior(truth, SIGMA_16, K16)
        runs = {"paper": lambda n, g: C.discretised_sample(probs, (20_000, 1), n, SIGMA_16, K16, g),
                "ode1": lambda n, g: C.discretised_sample_ode(probs, (20_000, 1), n, SIGMA_16, K16, 1, g),
                "ode2": lambda n, g: C.discretised_sample_ode(probs, (20_000, 1), n, SIGMA_16, K16, 2, g),
                "sde": lambda n, g: C.discretised_sample_sde(probs, (20_000, 1), n, SIGMA_16, K16, g)}
        score = lambda x: kl(truth, torch.bincount(C.bin_index(x, K16).flatten(), minlength=K16))  # noqa: E731
    else:
        probs = joint_marginals(P3)
        runs = {"paper": lambda n, g: C.discrete_sample(probs, (20_000, 3), n, BETA_1, 3, g),
                "ode1": lambda n, g: C.discrete_sample_ode(probs, (20_000, 3), n, BETA_1, 3, 1, g),
                "ode2": lambda n, g: C.discrete_sample_ode(probs, (20_000, 3), n, BETA_1, 3, 2, g),
                "sde": lambda n, g: C.discrete_sample_sde(probs, (20_000, 3), n, BETA_1, 3, g)}
        score = lambda x: kl(P3, torch.bincount(x[:, 0] * 9 + x[:, 1] * 3 + x[:, 2], minlength=27))  # noqa: E731
    for name, run in runs.items():
        for n in STEPS:
            table[name, n] = score(run(n, gen(n)))
    return table


@pytest.mark.parametrize("kind", ["continuous", "discretised", "discrete"])
def test_few_steps(kind):
    """Order 2 beats order 1 at 5 and 10 steps, and beats the paper's sampler there where that is not exact (for one
    dimension of discretised data with the exact posterior it is exact at any n); at 200 steps nothing is biased."""
    table = few_step_table(kind)
    for n in (5, 10):
        assert table["ode2", n] < table["ode1", n], (n, table)
        if kind != "discretised":
            assert table["ode2", n] < table["paper", n] and table["sde", n] < table["paper", n], (n, table)
    floor = 0.002  # 4x the bias of the half-count smoothing of 27 cells of 20,000 samples, or 40 of 40,000
    assert all(table[name, 200] < floor for name in ("paper", "ode1", "ode2", "sde")), table


# ---------------------------------------------------------------------------------------------------- known dimensions

# Two components whose x0 differ by little and x1 by much: x0 = 0.3 leaves x1 near 0.6, but the flow of x0 tells the
# two apart only late (t ≈ 1/3 at sigma_1 = 0.001), after x1 has taken a side.
W2, M2, S2 = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([[0.1, -0.6], [0.3, 0.6]]).double(), 0.05


ARGS = {"continuous": (SIGMA_1,), "discretised": (SIGMA_16, K16), "discrete": (BETA_1, 3)}  # schedule (and K)


def conditioned(kind, fn, name, known, P, n, g):
    """Sampler `name` (paper, ode, sde) of data `kind` with network function fn, conditioned on known: by replacement
    (P = 1), or by sequential Monte Carlo over P particles per example."""
    if P > 1:
        smc = getattr(C, f"{kind}_sample_smc")
        return smc(fn, known, n, *ARGS[kind], P, sde=name == "sde", generator=g)
    if kind == "continuous":
        fn = C.replace_known_x_hat(fn, known)
    else:
        k = known if kind == "discrete" else torch.where(known.isnan(), -1, C.bin_index(known.nan_to_num(), K16))
        fn = C.replace_known_probs(fn, k)
    return getattr(C, f"{kind}_sample" + {"paper": "", "ode": "_ode", "sde": "_sde"}[name])(fn, known.shape, n,
                                                                                           *ARGS[kind], generator=g)


def conditional_setups():
    """For each data type: (network function, sampler name -> sampler(known, particles, n, generator)), known value of
    dimension 0, and a score of samples (N, D): KL(p(x_1.. | x_0 = c) || samples)."""
    binned = binned_joint(W2, M2, S2, 20)  # the exact conditional of x1 given x0 in x0's bin, on 20 bins
    x0_bin = C.bin_index(torch.tensor(0.3), 20).item()
    continuous_truth = binned[x0_bin] / binned[x0_bin].sum()
    joint16 = binned_joint(W2, M2, S2, K16)
    k0 = C.bin_index(torch.tensor(0.3), K16).item()
    fns = {"continuous": mixture_x_hat(W2, M2, S2, SIGMA_1), "discretised": bins_posterior(joint16, SIGMA_16, K16),
           "discrete": joint_marginals(P3)}
    values_scores = {
        "continuous": (0.3, lambda x: kl(continuous_truth, histogram(x[:, 1], 20))),
        "discretised": (C.bin_centres(K16)[k0].item(), lambda x: kl(joint16[k0] / joint16[k0].sum(),
                                                                     torch.bincount(C.bin_index(x[:, 1], K16),
                                                                                    minlength=K16))),
        "discrete": (0, lambda x: kl(P3[0] / P3[0].sum(), torch.bincount(x[:, 1] * 3 + x[:, 2], minlength=9)))}
    return {kind: (fn, {name: (lambda known, P, n, g, kind=kind, fn=fn, name=name: conditioned(kind, fn, name, known,
                                                                                               P, n, g))
                        for name in ("paper", "ode", "sde")}, *values_scores[kind]) for kind, fn in fns.items()}


@pytest.mark.parametrize("kind", ["continuous", "discretised", "discrete"])
def test_replacement_keeps_the_known_values_but_smc_samples_the_conditional(kind):
    """Replacement keeps dimension 0 at its value but is biased for the others (it conditions them on noisy versions
    of the known value only); SMC with 16 particles per example samples p(x_rest | x_0) to within 0.02 nats (the
    samples' own smoothing bias included), for the paper's and the SDE sampler. The ODE takes replacement only."""
    _, samplers, value, score = conditional_setups()[kind]
    D = 3 if kind == "discrete" else 2
    N, n = 2000, 25
    if kind == "discrete":
        known = torch.full((N, D), -1)
    else:
        known = torch.full((N, D), float("nan"))
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
    smc = getattr(C, f"{kind}_sample_smc")(fn, nothing, 7, *ARGS[kind], 1, sde=name == "sde", generator=gen(9))
    assert torch.equal(smc, expected)
    assert torch.equal(plain(C.recorded(fn, trajectory), shape, 7, *ARGS[kind], generator=gen(9)), expected)
    assert len(trajectory) == 8 and trajectory[-1]["t"] == 1.0


def test_smc_weighs_particles_by_the_distribution_it_draws_from():
    """A guided prediction off the simplex (class 2 negative, the rest not normalised) and its normalised positive
    part, which _categorical draws from alike: the paper's sampler with sequential Monte Carlo gives them the same
    weights, so the same samples from the same generator. Weighing by the raw values instead favours particles whose
    raw values sum higher."""
    fn = joint_marginals(P3)

    def raw(theta, t):
        return torch.where(torch.arange(3) == 2, -0.3, 2 * fn(theta, t))

    def positive(theta, t):
        p = raw(theta, t).clamp_min(0)
        return p / p.sum(-1, keepdim=True)
    known = torch.full((500, 3), -1)
    known[:, 0] = 0
    a, b = (C.discrete_sample_smc(f, known, 10, *ARGS["discrete"], 8, generator=gen(3)) for f in (raw, positive))
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
            grad, = torch.autograd.grad(log_c.sum(), th)
        return C.discrete_guided_probs(probs(theta, t), theta, grad.float(), w)
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
    run = {"paper": C.continuous_sample, "ode": lambda *a, **k: C.continuous_sample_ode(*a, order=2, **k),
           "sde": C.continuous_sample_sde}[sampler]
    x_hat = mixture_x_hat(W1, M1, S1, SIGMA_1)

    def guided(w):
        def fn(mu, t):
            with torch.enable_grad():
                m = mu.detach().requires_grad_()
                log_c = component_log_posterior(m, t, W1, M1, S1, SIGMA_1).log_softmax(-1)[:, 1]
                grad, = torch.autograd.grad(log_c.sum(), m)
            return C.continuous_guided_x_hat(x_hat(mu, t), t, grad, w, SIGMA_1)
        return fn

    x = run(guided(1.0), (20_000, 1), 400, SIGMA_1, generator=gen(7)).double()
    n, m, s = len(x), M1[1, 0].item(), S1
    assert abs(x.mean().item() - m) < 5 * s / math.sqrt(n)
    assert abs(x.var().item() - s ** 2) < 5 * s ** 2 * math.sqrt(2 / (n - 1))
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
    if kind == "continuous":  # the mixture given x0: the components' weights times their density at x0
        told_weights = W2 * torch.exp(-(value - M2[:, 0]) ** 2 / (2 * S2 ** 2))
        told = {"paper": C.continuous_sample, "sde": C.continuous_sample_sde}
        fn = mixture_x_hat(told_weights / told_weights.sum(), M2[:, 1:], S2, SIGMA_1)
        run = lambda name, g: told[name](fn, (examples, 1), n, SIGMA_1, g)  # noqa: E731
    elif kind == "discretised":
        joint = binned_joint(W2, M2, S2, K16)[C.bin_index(torch.tensor(value), K16)]
        told = {"paper": C.discretised_sample, "sde": C.discretised_sample_sde}
        run = lambda name, g: told[name](bins_posterior(joint / joint.sum(), SIGMA_16, K16), (examples, 1), n,  # noqa
                                         SIGMA_16, K16, g)
    else:
        told = {"paper": C.discrete_sample, "sde": C.discrete_sample_sde}
        run = lambda name, g: told[name](joint_marginals(P3[0] / P3[0].sum()), (examples, 2), n, BETA_1, 3, g)  # noqa
    for name in ("paper", "sde"):
        rest = run(name, gen(99))
        rows[name, "told"] = score(torch.cat([torch.full((examples, 1), value).to(rest.dtype), rest], 1))
    return rows


def test_a_class_of_probability_zero_is_never_drawn(monkeypatch):
    """At the ends of the uniform draw (u = 0, u just below 1) the inverse-CDF draw skips classes of probability 0,
    and a negative entry (a guided prediction off the simplex) counts as 0."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 1.0, -0.2, 0.0, 0.2]])
    for u in (0.0, 1 - 1e-7):
        monkeypatch.setattr(torch, "rand", lambda shape, **kwargs: torch.full(shape, u))
        k = C._categorical(probs)
        assert (probs.gather(-1, k[:, None]) > 0).all(), (u, k)
