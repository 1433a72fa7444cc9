"""Tests of common.py against closed-form facts of the paper (the flow after all steps, additivity of accuracies, losses
of exact posteriors equal to the data entropy, ...) and against independent computations.

    python -m pytest -q tests/test_common.py

Monte Carlo checks use a fixed seed and a tolerance of Z standard errors of the estimate, never a hand-picked bound.
"""

import math

import pytest
import torch
from torch.distributions import Normal

import common as C

Z = 5.0  # standard errors allowed in Monte Carlo comparisons


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_mean(samples, expected, z=Z):
    """The sample mean is within z standard errors of `expected`."""
    s = samples.double().flatten()
    mean, se = s.mean().item(), s.std().item() / math.sqrt(s.numel())
    assert abs(mean - expected) <= z * se, f"mean {mean:.5f} vs expected {expected:.5f} (se {se:.5f})"


def assert_same_mean(a, b, z=Z):
    """Two independent samples have means within z standard errors of their difference."""
    a, b = a.double().flatten(), b.double().flatten()
    se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
    message = f"{a.mean().item():.5f} vs {b.mean().item():.5f} (se {se:.5f})"
    assert abs(a.mean().item() - b.mean().item()) <= z * se, message


def assert_variance(samples, expected, z=Z):
    """Sample variance of Gaussian data within z standard errors (se = var sqrt(2 / (N - 1)))."""
    s = samples.double().flatten()
    se = expected * math.sqrt(2 / (s.numel() - 1))
    assert abs(s.var().item() - expected) <= z * se, f"variance {s.var().item():.5f} vs {expected:.5f} (se {se:.5f})"


# ---------------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("sigma_1", [0.001, math.sqrt(0.001), 0.3])
def test_continuous_schedule(sigma_1):
    n = 50
    i = torch.arange(1, n + 1, dtype=torch.float64)
    alpha = C.continuous_alpha(i, n, sigma_1)
    beta = lambda t: sigma_1 ** (-2 * t) - 1  # noqa: E731
    torch.testing.assert_close(alpha, beta(i / n) - beta((i - 1) / n))
    torch.testing.assert_close(alpha.sum().item(), sigma_1**-2 - 1)
    assert C.continuous_gamma(torch.tensor(0.0), sigma_1).item() == 0
    gamma_1 = C.continuous_gamma(torch.tensor(1.0, dtype=torch.float64), sigma_1).item()
    torch.testing.assert_close(gamma_1, 1 - sigma_1**2)
    # gamma = beta / (1 + beta)
    t = torch.rand(10, dtype=torch.float64, generator=gen())
    torch.testing.assert_close(C.continuous_gamma(t, sigma_1), beta(t) / (1 + beta(t)))


@pytest.mark.parametrize("beta_1", [9.0, 0.5625])
def test_discrete_schedule(beta_1):
    n = 37
    i = torch.arange(1, n + 1, dtype=torch.float64)
    alpha = C.discrete_alpha(i, n, beta_1)
    torch.testing.assert_close(alpha, C.discrete_beta(i / n, beta_1) - C.discrete_beta((i - 1) / n, beta_1))
    torch.testing.assert_close(alpha.sum().item(), beta_1)
    assert C.discrete_beta(torch.tensor(0.0), beta_1).item() == 0


def test_continuous_updates_reach_final_precision():
    sigma_1, n = 0.01, 25
    mu, rho = torch.zeros(3), 1.0
    for i in range(1, n + 1):
        alpha = C.continuous_alpha(torch.tensor(i, dtype=torch.float64), n, sigma_1).item()
        mu, rho = C.continuous_update(mu, rho, torch.randn(3, generator=gen(i)), alpha)
    assert rho == pytest.approx(sigma_1**-2, rel=1e-9)


# ---------------------------------------------------------------------------------------------------- flows


def test_flow_at_t0_is_the_prior():
    x = torch.rand(4, 5) * 2 - 1
    t = torch.zeros(4)
    assert torch.equal(C.continuous_flow(x, t, 0.001, gen()), torch.zeros(4, 5))
    theta = C.discrete_flow(torch.randint(0, 7, (4, 5)), t, 3.0, 7, gen())
    torch.testing.assert_close(theta, torch.full((4, 5, 7), 1 / 7))


def test_continuous_flow_moments():
    sigma_1, N = 0.02, 200_000
    x = torch.full((N,), 0.4)
    t = torch.full((N,), 0.35)
    gamma = C.continuous_gamma(torch.tensor(0.35, dtype=torch.float64), sigma_1).item()
    mu = C.continuous_flow(x, t, sigma_1, gen())
    assert_mean(mu, gamma * 0.4)
    assert_variance(mu, gamma * (1 - gamma))


def test_continuous_sequential_updates_match_flow():
    """m updates from the prior with alpha_1..alpha_m give mu ~ p_F(. | x; m / n) (additivity of accuracies)."""
    sigma_1, n, m, N = 0.01, 20, 7, 100_000
    g = gen(1)
    x = torch.full((N,), -0.3)
    mu, rho = torch.zeros(N), 1.0
    for i in range(1, m + 1):
        alpha = C.continuous_alpha(i, n, sigma_1).item()
        y = x + torch.randn(N, generator=g) / math.sqrt(alpha)
        mu, rho = C.continuous_update(mu, rho, y, alpha)
    gamma = C.continuous_gamma(torch.tensor(m / n, dtype=torch.float64), sigma_1).item()
    assert rho == pytest.approx(1 / (1 - gamma), rel=1e-6)  # rho(t) = sigma_1^(-2t)
    assert_mean(mu, gamma * -0.3)
    assert_variance(mu, gamma * (1 - gamma))
    assert_same_mean(mu, C.continuous_flow(x, torch.full((N,), m / n), sigma_1, g))


def test_discrete_flow_logit_moments():
    """ln theta_x - ln theta_j = y_x - y_j ~ N(beta K, 2 beta K) for j != x."""
    beta_1, K, N, t = 2.0, 5, 100_000, 0.6
    x = torch.full((N,), 2)
    theta = C.discrete_flow(x, torch.full((N,), t), beta_1, K, gen(2))
    d = theta[:, 2].log() - theta[:, 0].log()
    beta = beta_1 * t**2
    assert_mean(d, beta * K)
    assert_variance(d, 2 * beta * K)


def test_discrete_sequential_updates_match_flow():
    beta_1, K, n, m, N = 3.0, 4, 10, 6, 50_000
    g = gen(3)
    x = torch.randint(0, K, (N,), generator=g)
    e_x = torch.nn.functional.one_hot(x, K).float()
    theta = torch.full((N, K), 1 / K)
    for i in range(1, m + 1):
        alpha = C.discrete_alpha(i, n, beta_1).item()
        y = alpha * (K * e_x - 1) + math.sqrt(alpha * K) * torch.randn(N, K, generator=g)
        theta = C.discrete_update(theta, y)
    flow = C.discrete_flow(x, torch.full((N,), m / n), beta_1, K, g)
    for k in range(K):
        assert_same_mean(theta[:, k], flow[:, k])
    assert_same_mean((theta * e_x).sum(-1), (flow * e_x).sum(-1))  # the probability of the true class


def test_discrete_update_stays_on_the_simplex_and_matches_bayes_rule():
    g = gen(4)
    theta = torch.softmax(torch.randn(100, 6, generator=g), -1)
    y = torch.randn(100, 6, generator=g)
    direct = theta * y.exp() / (theta * y.exp()).sum(-1, keepdim=True)
    torch.testing.assert_close(C.discrete_update(theta, y), direct)
    big = C.discrete_update(theta, 500 * torch.randn(100, 6, generator=g))
    assert torch.isfinite(big).all() and (big >= 0).all()
    torch.testing.assert_close(big.sum(-1), torch.ones(100))


# ---------------------------------------------------------------------------------------------------- continuous


def test_continuous_x_hat_inverts_the_flow_and_clips():
    sigma_1 = 0.001
    g = gen(5)
    x = torch.rand(64, 3) * 1.8 - 0.9
    t = torch.rand(64, generator=g) * 0.9 + 0.05
    mu = C.continuous_flow(x, t, sigma_1, g)
    gamma = C.continuous_gamma(t, sigma_1)[:, None]
    eps = (mu - gamma * x) / (gamma * (1 - gamma)).sqrt()  # the true noise
    torch.testing.assert_close(C.continuous_x_hat(mu, t, eps, sigma_1), x, atol=2e-4, rtol=0)
    assert C.continuous_x_hat(mu, t, eps + 1e4, sigma_1).min() == -1
    assert C.continuous_x_hat(mu, t, eps - 1e4, sigma_1).max() == 1


def test_continuous_x_hat_at_t0_is_zero_with_finite_gradient():
    mu = torch.zeros(2, 3, requires_grad=True)
    eps = torch.randn(2, 3, requires_grad=True)
    x_hat = C.continuous_x_hat(mu, torch.tensor([0.0, 0.5]), eps, 0.001)
    assert torch.equal(x_hat[0], torch.zeros(3))
    x_hat.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(eps.grad).all()


def gaussian_posterior_mean(mu, t, s, sigma_1):
    """E[x | mu, t] for x ~ N(0, s^2): mu s^2 / ((1 - gamma) + gamma s^2)."""
    gamma = C.continuous_gamma(t, sigma_1).reshape(-1, *[1] * (mu.dim() - 1))
    return mu * s**2 / ((1 - gamma) + gamma * s**2)


def test_continuous_loss_inf_gaussian_data_closed_form():
    """x ~ N(0, s^2) with the exact posterior mean: E L^inf = (D / 2) ln(1 + s^2 beta(1)), beta(1) = sigma_1^-2 - 1."""
    sigma_1, s, D, N = 0.05, 0.5, 3, 200_000
    g = gen(6)
    x = s * torch.randn(N, D, generator=g, dtype=torch.float64)
    t = torch.rand(N, generator=g, dtype=torch.float64)
    mu = C.continuous_flow(x, t, sigma_1, g)
    loss = C.continuous_loss_inf(x, gaussian_posterior_mean(mu, t, s, sigma_1), t, sigma_1)
    assert loss.shape == (N,)
    assert_mean(loss, D / 2 * math.log(1 + s**2 * (sigma_1**-2 - 1)))


def test_continuous_loss_n_gaussian_data_closed_form_and_decreases_to_loss_inf():
    """E L^n = sum_i (alpha_i / 2) D v(t_{i-1}) with posterior variance v(t) = s^2 / (1 + s^2 beta(t))."""
    sigma_1, s, D, N = 0.05, 0.5, 2, 200_000
    beta = lambda t: sigma_1 ** (-2 * t) - 1  # noqa: E731
    exact = {}
    for n in [1, 4, 20, 1000]:
        i = torch.arange(1, n + 1, dtype=torch.float64)
        v = s**2 / (1 + s**2 * beta((i - 1) / n))
        exact[n] = (C.continuous_alpha(i, n, sigma_1) / 2 * D * v).sum().item()
    loss_inf = D / 2 * math.log(1 + s**2 * beta(1.0))
    assert exact[1] > exact[4] > exact[20] > exact[1000] > loss_inf
    assert exact[1000] == pytest.approx(loss_inf, rel=0.01)
    g = gen(7)
    for n in [1, 4, 20]:
        x = s * torch.randn(N, D, generator=g, dtype=torch.float64)
        i = torch.randint(1, n + 1, (N,), generator=g)
        t = (i - 1) / n
        mu = C.continuous_flow(x, t, sigma_1, g)
        assert_mean(C.continuous_loss_n(x, gaussian_posterior_mean(mu, t, s, sigma_1), i, n, sigma_1), exact[n])


def test_continuous_recon_loss_is_a_discretised_gaussian():
    g = gen(8)
    K, std = 16, 0.05
    v = torch.randint(0, K, (32, 5), generator=g)
    x = C.bin_centres(K)[v]
    x_hat = (x + 0.1 * torch.randn(32, 5, generator=g)).clamp(-1, 1)
    edges = torch.linspace(-1, 1, K + 1)
    cdf = Normal(x_hat, std).cdf
    lo = torch.where(v == 0, torch.zeros(()), cdf(edges[v]))
    hi = torch.where(v == K - 1, torch.ones(()), cdf(edges[v + 1]))
    expected = -(hi - lo).log().sum(1)
    torch.testing.assert_close(C.continuous_recon_loss(x, x_hat, std, K), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- discretised


def test_bins():
    torch.testing.assert_close(C.bin_centres(4), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    v = torch.arange(256)
    x = v / 255 * 2 - 1  # 8-bit pixels scaled to [-1, 1]
    assert torch.equal(C.bin_index(x, 256), v)
    assert torch.equal(C.bin_index(x, 16), v * 16 // 256)
    assert torch.equal(C.bin_index(C.bin_centres(16), 16), torch.arange(16))


def test_discretised_probs_sum_to_one_and_match_the_cdf():
    g = gen(9)
    K = 10
    mu_x = torch.randn(50, 3, generator=g) * 1.5
    sigma_x = torch.rand(50, 3, generator=g) * 0.8 + 0.01
    probs = C.discretised_probs(mu_x, sigma_x, K)
    torch.testing.assert_close(C.discretised_log_probs(mu_x, sigma_x, K).exp(), probs, atol=1e-6, rtol=1e-4)
    assert probs.shape == (50, 3, K) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(50, 3))
    cdf = Normal(mu_x[..., None], sigma_x[..., None]).cdf(torch.linspace(-1, 1, K + 1))
    torch.testing.assert_close(probs[..., 1:-1], cdf[..., 2:-1] - cdf[..., 1:-2], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(probs[..., 0], cdf[..., 1], atol=1e-6, rtol=1e-4)  # the left tail
    torch.testing.assert_close(probs[..., -1], 1 - cdf[..., -2], atol=1e-6, rtol=1e-4)  # the right tail


def test_discretised_output_recovers_the_data_from_the_true_noise_and_is_uniform_at_t_0():
    """Given the noise that made mu from x (mu = gamma x + sqrt(gamma (1 - gamma)) eps), mu_eps = eps gives mu_x = x
    exactly, so a small sigma_eps puts all the mass on x's bin; at t = 0 the output is N(0, 1) discretised."""
    sigma_1, K = 0.02, 16
    g = gen(10)
    x = C.bin_centres(K)[torch.randint(0, K, (3, 4, 4), generator=g)]
    eps = torch.randn(3, 4, 4, generator=g)
    t = torch.tensor([0.2, 0.6, 1.0])
    gamma = 1 - sigma_1 ** (2 * t.double())[:, None, None]  # in float64, independently of common.py
    mu = (gamma * x + (gamma * (1 - gamma)).sqrt() * eps).float()
    probs = C.discretised_log_probs(*C.discretised_output(mu, t, eps, torch.full_like(mu, -12.0), sigma_1), K).exp()
    assert probs.shape == (3, 4, 4, K)
    assert (probs.argmax(-1) == C.bin_index(x, K)).all() and (probs.max(-1).values > 0.999).all()
    at_0 = C.discretised_probs(*C.discretised_output(mu, torch.zeros(3), eps, torch.zeros_like(mu), sigma_1), K)
    edges = torch.linspace(-1, 1, K + 1)
    cdf = Normal(0.0, 1.0).cdf(edges)
    torch.testing.assert_close(at_0[0, 0, 0, 1:-1], cdf[2:-1] - cdf[1:-2])


def exact_bin_posterior(mu, t, sigma_1, K, log_prior=None):
    """p(k | mu, t) ∝ pi_k N(mu | gamma k_c, gamma (1 - gamma)) for data on the K bin centres. (B, D) -> (B, D, K)."""
    gamma = C.continuous_gamma(t.clamp_min(1e-6), sigma_1).reshape(-1, 1, 1).double()
    logits = -((mu[..., None].double() - gamma * C.bin_centres(K).double()) ** 2) / (2 * gamma * (1 - gamma))
    if log_prior is not None:
        logits = logits + log_prior
    return torch.softmax(logits, -1)


def test_discretised_losses_exact_posterior_give_ln_K():
    """Data uniform over K bins with the exact posterior output: E[L^inf + L^r] = E[L^n + L^r] = -ln p(x) = D ln K."""
    sigma_1, K, D, N = 0.1, 4, 2, 100_000
    g = gen(11)
    x = C.bin_centres(K)[torch.randint(0, K, (N, D), generator=g)]
    mu1 = C.continuous_flow(x, torch.ones(N), sigma_1, g)
    posterior = exact_bin_posterior(mu1, torch.ones(N), sigma_1, K)
    recon = -posterior.gather(-1, C.bin_index(x, K)[..., None]).log().sum((1, 2))
    t = torch.rand(N, generator=g)
    mu = C.continuous_flow(x, t, sigma_1, g)
    loss_inf = C.discretised_loss_inf(x, mean_bin(exact_bin_posterior(mu, t, sigma_1, K)), t, sigma_1)
    assert_mean(loss_inf + recon, D * math.log(K))
    for n in [1, 3, 30]:
        i = torch.randint(1, n + 1, (N,), generator=g)
        mu = C.continuous_flow(x, (i - 1) / n, sigma_1, g)
        loss_n = C.discretised_loss_n(x, exact_bin_posterior(mu, (i - 1) / n, sigma_1, K).log(), i, n, sigma_1, g)
        assert_mean(loss_n + recon, D * math.log(K))


def test_discretised_loss_n_matches_the_mixture_density():
    """One sender draw, the same seed: the loss equals ln N(y | x, 1/alpha) - ln sum_k p_k N(y | k_c, 1/alpha)."""
    K, n, sigma_1 = 8, 5, 0.05
    g = gen(12)
    x = C.bin_centres(K)[torch.randint(0, K, (6, 3), generator=g)]
    probs = torch.softmax(torch.randn(6, 3, K, generator=g), -1)
    i = torch.randint(1, n + 1, (6,), generator=g)
    loss = C.discretised_loss_n(x, probs.log(), i, n, sigma_1, gen(13))
    alpha = C.continuous_alpha(i, n, sigma_1)[:, None]
    y = x + torch.randn(x.shape, generator=gen(13)) / alpha.sqrt()
    std = 1 / alpha.sqrt()
    log_s = Normal(x, std).log_prob(y)
    log_r = torch.logsumexp(probs.log() + Normal(C.bin_centres(K), std[..., None]).log_prob(y[..., None]), -1)
    torch.testing.assert_close(loss, n * (log_s - log_r).sum(1), rtol=1e-4, atol=1e-3)


def test_the_mean_bin_by_parts_is_the_mean_of_the_bin_probabilities():
    """discretised_k_hat, summed by parts over the inner edges, is sum_k p_O(k) k_c of the clipped discretised Gaussian
    (float64), with its tails in the end bins: means inside, near and far beyond [-1, 1], widths from tiny to wide."""
    mu_x = torch.tensor([0.0, 0.3, -0.97, 0.999, 1.4, -3.0, 0.5, 0.12]).double()
    sigma_x = torch.tensor([1e-3, 0.05, 0.2, 0.01, 0.3, 2.0, 10.0, 0.004]).double()
    for K in (2, 16, 256):
        expected = mean_bin(C.discretised_probs(mu_x, sigma_x, K))
        torch.testing.assert_close(C.discretised_k_hat(mu_x, sigma_x, K), expected, rtol=0, atol=1e-9)
        k_hat32 = C.discretised_k_hat(mu_x.float(), sigma_x.float(), K)
        torch.testing.assert_close(k_hat32.double(), expected, rtol=0, atol=2e-6)  # float32, 255 terms


def test_discretised_loss_inf_is_zero_for_a_sure_output_and_the_data_norm_for_a_uniform_one():
    """A one-hot p_O at x's bin has k_hat = x, so L^inf = 0; a uniform p_O has k_hat = 0 (the centres are symmetric),
    so L^inf = -ln(sigma_1) sigma_1^(-2t) ||x||^2."""
    sigma_1, K = 0.001, 256
    g = gen(14)
    x = C.bin_centres(K)[torch.randint(0, K, (4, 3, 2, 2), generator=g)]
    t = torch.rand(4, generator=g)
    sure = torch.nn.functional.one_hot(C.bin_index(x, K), K).float()
    torch.testing.assert_close(C.discretised_loss_inf(x, mean_bin(sure), t, sigma_1), torch.zeros(4), atol=1e-6, rtol=0)
    uniform = torch.full((4, 3, 2, 2, K), 1 / K)
    expected = math.log(1 / sigma_1) * (1 / sigma_1) ** (2 * t.double()) * (x.double() ** 2).sum((1, 2, 3))
    torch.testing.assert_close(
        C.discretised_loss_inf(x, mean_bin(uniform), t, sigma_1).double(), expected, rtol=1e-5, atol=1e-3
    )


# ---------------------------------------------------------------------------------------------------- discrete


@pytest.mark.parametrize("K,beta_1", [(2, 9.0), (27, 0.5625)])
def test_discrete_uniform_output_loss_inf(K, beta_1):
    """e_hat = 1/K: L^inf = K beta(1) t (K - 1) / K per dimension, whose mean over t ~ U(0,1) is beta(1) (K - 1) / 2."""
    D, M = 10, 1000
    t = (torch.arange(M, dtype=torch.float64) + 0.5) / M  # midpoints integrate a linear function exactly
    x = torch.randint(0, K, (M, D), generator=gen(15))
    loss = C.discrete_loss_inf(x, torch.full((M, D, K), 1 / K, dtype=torch.float64), t, beta_1)
    assert loss.mean().item() == pytest.approx(D * beta_1 * (K - 1) / 2, rel=1e-9)
    if K == 2:
        assert loss.mean().item() / D == pytest.approx(4.5)  # nats per pixel on MNIST


def test_discrete_losses_exact_posterior_give_the_entropy():
    """x iid ~ pi with the output p_O(k | theta) ∝ pi_k theta_k (the exact posterior):
    E[L^inf + L^r] = E[L^n + L^r] = D H(pi) for every n."""
    beta_1, D, N = 3.0, 3, 100_000
    pi = torch.tensor([0.5, 0.3, 0.15, 0.05])
    K = len(pi)
    H = -(pi * pi.log()).sum().item()
    posterior = lambda theta: pi * theta / (pi * theta).sum(-1, keepdim=True)  # noqa: E731
    g = gen(16)
    x = torch.multinomial(pi, N * D, replacement=True, generator=g).reshape(N, D)
    recon = C.discrete_recon_loss(x, posterior(C.discrete_flow(x, torch.ones(N), beta_1, K, g)).log())
    t = torch.rand(N, generator=g)
    loss_inf = C.discrete_loss_inf(x, posterior(C.discrete_flow(x, t, beta_1, K, g)), t, beta_1)
    assert_mean(loss_inf + recon, D * H)
    for n in [1, 4, 50]:
        i = torch.randint(1, n + 1, (N,), generator=g)
        theta = C.discrete_flow(x, (i - 1) / n, beta_1, K, g)
        assert_mean(C.discrete_loss_n(x, posterior(theta).log(), i, n, beta_1, g) + recon, D * H)


def receiver_log_density(y, probs, alpha, K, factorised=False):
    """ln p_R(y) written out from Normal densities: the joint K-dimensional mixture
    sum_k p_k prod_j N(y_j | alpha (K delta_jk - 1), alpha K), or its per-coordinate factorisation."""
    std = math.sqrt(alpha * K)
    means = alpha * (K * torch.eye(K, dtype=torch.float64) - 1)  # row k: the sender mean for class k
    comp = Normal(means, std).log_prob(y[..., None, :])  # (..., k, j)
    if factorised:  # prod_j sum_k p_k N(y_j | mean_kj)
        return torch.logsumexp(probs.log()[..., :, None] + comp, -2).sum(-1)
    return torch.logsumexp(probs.log() + comp.sum(-1), -1)


def test_discrete_loss_n_is_the_joint_mixture_kl_not_the_factorised_one():
    beta_1, K, n, N = 3.0, 5, 1, 200_000
    g = gen(17)
    x = torch.randint(0, K, (N, 1), generator=g)
    probs = torch.softmax(torch.randn(N, 1, K, generator=g, dtype=torch.float64), -1)
    i = torch.ones(N, dtype=torch.long)
    # the same seed gives the same sender draw: the loss equals the mixture written out, term by term
    loss = C.discrete_loss_n(x, probs.log(), i, n, beta_1, gen(18))
    alpha = C.discrete_alpha(1, n, beta_1).item()
    e_x = torch.nn.functional.one_hot(x, K).double()
    y = alpha * (K * e_x - 1) + math.sqrt(alpha * K) * torch.randn(e_x.shape, generator=gen(18), dtype=torch.float64)
    log_s = Normal(alpha * (K * e_x - 1), math.sqrt(alpha * K)).log_prob(y).sum(-1)
    joint = n * (log_s - receiver_log_density(y, probs, alpha, K)).sum(1)
    torch.testing.assert_close(loss, joint, rtol=1e-5, atol=1e-5)
    # independent draws: the factorised receiver's KL is measurably larger at n = 1
    y2 = alpha * (K * e_x - 1) + math.sqrt(alpha * K) * torch.randn(e_x.shape, generator=g, dtype=torch.float64)
    log_s2 = Normal(alpha * (K * e_x - 1), math.sqrt(alpha * K)).log_prob(y2).sum(-1)
    factorised = n * (log_s2 - receiver_log_density(y2, probs, alpha, K, factorised=True)).sum(1)
    diff = factorised.mean() - loss.mean()
    se = math.sqrt(factorised.var() / N + loss.var() / N)
    assert diff > 10 * se, f"factorised {factorised.mean():.4f} vs joint {loss.mean():.4f}"


# ---------------------------------------------------------------------------------------------------- samplers


def mean_bin(probs):
    """k_hat = sum_k p_O(k) k_c of any probabilities over K bins (B, ..., K) -> (B, ...)."""
    return (probs * C.bin_centres(probs.shape[-1]).to(probs.dtype)).sum(-1)


def recorded(fn, trajectory):
    """fn, appending each call's t and input to trajectory: what the scripts record for their evolution figures."""

    def call(inputs, t):
        trajectory.append({"t": t[0].item(), "input": inputs})
        return fn(inputs, t)

    return call


class Counter:
    def __init__(self, fn):
        self.fn, self.calls, self.ts = fn, 0, []

    def __call__(self, inp, t):
        self.calls += 1
        self.ts.append(t[0].item())
        return self.fn(inp, t)


@pytest.mark.parametrize("n", [1, 7])
def test_samplers_call_the_network_n_plus_one_times(n):
    K = 4
    cont = Counter(lambda mu, t: torch.zeros_like(mu))
    traj = []
    x = C.continuous_sample(recorded(cont, traj), (3, 2), n, 0.01, gen())
    disc = Counter(lambda mu, t: torch.full(mu.shape + (K,), 1 / K))
    C.discretised_sample(disc, (3, 2), n, 0.01, K, gen())
    cat = Counter(lambda theta, t: theta)
    k = C.discrete_sample(cat, (3, 2), n, 2.0, K, gen())
    expected_t = [(i - 1) / n for i in range(1, n + 1)] + [1.0]
    for c in (cont, disc, cat):
        assert c.calls == n + 1
        assert c.ts == pytest.approx(expected_t)
    assert [step["t"] for step in traj] == pytest.approx(expected_t)
    assert x.shape == (3, 2) and k.shape == (3, 2) and k.dtype == torch.long


def test_samplers_are_reproducible_with_a_generator():
    fn = lambda theta, t: torch.softmax(3 * theta, -1)  # noqa: E731
    a = C.discrete_sample(fn, (5, 8), 10, 3.0, 3, gen(1))
    b = C.discrete_sample(fn, (5, 8), 10, 3.0, 3, gen(1))
    assert torch.equal(a, b)


def assert_frequencies(samples, pi):
    """Each class frequency within Z binomial standard errors of pi."""
    N = samples.numel()
    for k, p in enumerate(pi.tolist()):
        f = (samples == k).double().mean().item()
        se = math.sqrt(p * (1 - p) / N)
        assert abs(f - p) <= Z * se, f"class {k}: frequency {f:.4f} vs {p:.4f} (se {se:.4f})"


@pytest.mark.parametrize("n", [1, 3, 25])
def test_discrete_sample_with_the_exact_posterior_reproduces_the_data(n):
    pi = torch.tensor([0.6, 0.25, 0.1, 0.05])
    fn = lambda theta, t: pi * theta / (pi * theta).sum(-1, keepdim=True)  # noqa: E731
    k = C.discrete_sample(fn, (20_000, 2), n, 4.0, len(pi), gen(20 + n))
    assert_frequencies(k, pi)
    joint = k[:, 0] * len(pi) + k[:, 1]  # the two dimensions are independent
    assert_frequencies(joint, (pi[:, None] * pi[None, :]).flatten())


@pytest.mark.parametrize("n", [1, 4, 25])
def test_discretised_sample_with_the_exact_posterior_reproduces_the_data(n):
    sigma_1, K = 0.05, 5
    pi = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    fn = lambda mu, t: exact_bin_posterior(mu, t, sigma_1, K, pi.log().double()).float()  # noqa: E731
    x = C.discretised_sample(fn, (40_000, 1), n, sigma_1, K, gen(30 + n))
    assert_frequencies(C.bin_index(x, K), pi)


def test_continuous_sample_with_the_exact_posterior_mean():
    """x ~ N(0, s^2) and x_hat = E[x | mu, t]: every step is linear-Gaussian, so the variance of Algorithm 3's output
    follows a recursion computed here independently; as n grows it approaches s^2."""
    sigma_1, s, N = 0.05, 0.5, 100_000

    def exact_variance(n):
        c = lambda t: s**2 / ((1 - (1 - sigma_1 ** (2 * t))) + (1 - sigma_1 ** (2 * t)) * s**2)  # noqa: E731
        v, rho = 0.0, 1.0
        for i in range(1, n + 1):
            alpha = sigma_1 ** (-2 * i / n) * (1 - sigma_1 ** (2 / n))
            a = (rho + alpha * c((i - 1) / n)) / (rho + alpha)
            v, rho = a * a * v + alpha / (rho + alpha) ** 2, rho + alpha
        return c(1.0) ** 2 * v

    fn = lambda mu, t: gaussian_posterior_mean(mu, t, s, sigma_1)  # noqa: E731
    for n in [2, 50]:
        x = C.continuous_sample(fn, (N,), n, sigma_1, gen(40 + n))
        assert_mean(x, 0.0)
        assert_variance(x, exact_variance(n))
    assert abs(exact_variance(500) - s**2) < abs(exact_variance(50) - s**2) < abs(exact_variance(2) - s**2)


# ---------------------------------------------------------------------------------------------------- numerics


def test_no_nan_or_inf_at_the_extremes():
    g = gen(50)
    t = torch.tensor([0.0, 1e-7, 0.5, 1.0])
    for sigma_1 in [1e-4, 0.001, 0.5]:
        x = torch.rand(4, 8, generator=g) * 2 - 1
        mu = C.continuous_flow(x, t, sigma_1, g)
        eps = torch.randn(4, 8, generator=g)
        x_hat = C.continuous_x_hat(mu, t, eps, sigma_1)
        out = C.discretised_output(mu, t, eps, eps, sigma_1)
        log_probs = C.discretised_log_probs(*out, 256)
        for v in [
            mu,
            x_hat,
            log_probs,
            C.continuous_loss_inf(x, x_hat, t, sigma_1),
            C.continuous_loss_n(x, x_hat, torch.tensor([1, 1, 5, 10]), 10, sigma_1),
            C.continuous_recon_loss(x, x_hat, sigma_1, 256),
            C.discretised_loss_inf(x, mean_bin(log_probs.exp()), t, sigma_1),
            C.discretised_loss_n(x, log_probs, torch.tensor([1, 2, 10, 10]), 10, sigma_1, g),
            C.discretised_recon_loss(x, *out, 256),
        ]:
            assert torch.isfinite(v).all()
    for beta_1 in [1e-3, 9.0, 1e4]:
        x = torch.randint(0, 27, (4, 8), generator=g)
        theta = C.discrete_flow(x, t, beta_1, 27, g)
        logits = torch.randn(4, 8, 27, generator=g) * 30  # nearly one-hot outputs
        probs, log_probs = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
        for v in [
            theta,
            C.discrete_loss_inf(x, probs, t, beta_1),
            C.discrete_recon_loss(x, log_probs),
            C.discrete_loss_n(x, log_probs, torch.tensor([1, 1, 5, 10]), 10, beta_1, g),
            C.discrete_update(theta, 1e3 * torch.randn(4, 8, 27, generator=g)),
        ]:
            assert torch.isfinite(v).all()
        k = C.discrete_sample(lambda th, t: th, (2, 3), 5, beta_1, 27, g)
        assert ((k >= 0) & (k < 27)).all()


def test_losses_run_in_float32_under_autocast():
    g = gen(51)
    x = torch.rand(4, 6, generator=g) * 2 - 1
    t = torch.rand(4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat = C.continuous_x_hat(x.bfloat16(), t, torch.randn(4, 6).bfloat16(), 0.01)
        probs = torch.softmax(torch.randn(4, 6, 3), -1).bfloat16()
        xs = torch.randint(0, 3, (4, 6))
        bin_probs = C.discretised_probs(*C.discretised_output(x.bfloat16(), t, x.bfloat16(), x.bfloat16(), 0.01), 16)
        losses = [
            x_hat,
            C.continuous_loss_inf(x, x_hat, t, 0.01),
            C.discretised_loss_inf(x, mean_bin(bin_probs), t, 0.01),
            C.discrete_loss_inf(xs, probs, t, 3.0),
            C.discrete_loss_n(xs, probs.log(), torch.ones(4, dtype=torch.long), 2, 3.0),
            C.discrete_recon_loss(xs, probs.log()),
        ]
    for v in losses:
        assert v.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- ODE samplers


@pytest.mark.parametrize("n", [1, 6])
def test_ode_samplers_call_the_network_n_plus_one_times(n):
    """n + 1 calls at increasing times: the first inside the first step (where the input is informative), then
    t_1, ..., t_{n-1}, then t = 1."""
    K = 3
    cont = Counter(lambda mu, t: torch.zeros_like(mu))
    disc = Counter(lambda mu, t: torch.full(mu.shape + (K,), 1 / K))
    cat = Counter(lambda theta, t: theta)
    traj = []
    x = C.continuous_sample_ode(recorded(cont, traj), (2, 3), n, 0.01, generator=gen())
    C.discretised_sample_ode(disc, (2, 3), n, 0.01, K, generator=gen())
    k = C.discrete_sample_ode(cat, (2, 3), n, 2.0, K, generator=gen())
    for c in (cont, disc, cat):
        assert c.calls == n + 1
        assert 0 < c.ts[0] < 1 / n and c.ts[1:] == pytest.approx([i / n for i in range(1, n)] + [1.0])
    assert cat.ts[0] == pytest.approx(1 / (2 * n))
    assert [s["t"] for s in traj] == pytest.approx(cont.ts) and x.shape == k.shape == (2, 3)


def test_continuous_ode_is_exact_for_gaussian_data():
    """x ~ N(0, s^2) with the exact posterior mean: the ODE maps z linearly onto mu_1, whose exact law is
    N(0, gamma_1^2 s^2 + gamma_1 (1 - gamma_1)). The output is x_hat(mu_1, 1) = c_1 mu_1, so the output / z ratio
    (one sample; the first draw of the generator is z) measures the solver's error."""
    sigma_1, s = 0.05, 0.5
    fn = lambda mu, t: gaussian_posterior_mean(mu, t, s, sigma_1)  # noqa: E731
    gamma_1 = 1 - sigma_1**2
    c_1 = s**2 / ((1 - gamma_1) + gamma_1 * s**2)
    exact = c_1 * math.sqrt(gamma_1**2 * s**2 + gamma_1 * (1 - gamma_1))
    z = torch.randn((1,), generator=gen(60)).item()
    error = {
        (order, n): abs(C.continuous_sample_ode(fn, (1,), n, sigma_1, order, gen(60)).item() / z - exact)
        for order in (1, 2)
        for n in (5, 20, 200)
    }
    assert error[(2, 20)] < 0.01 * exact and error[(2, 200)] < 0.001 * exact  # second order: few steps suffice
    assert error[(2, 5)] < error[(1, 5)] / 2 and error[(2, 20)] < error[(1, 20)] / 5
    assert error[(1, 200)] < error[(1, 20)] < error[(1, 5)]


@pytest.mark.parametrize("order", [1, 2])
def test_discrete_ode_with_the_exact_posterior_reproduces_the_data(order):
    pi = torch.tensor([0.6, 0.25, 0.1, 0.05])
    fn = lambda theta, t: pi * theta / (pi * theta).sum(-1, keepdim=True)  # noqa: E731
    k = C.discrete_sample_ode(fn, (20_000,), 100, 4.0, len(pi), order, gen(61 + order))
    assert_frequencies(k, pi)


def test_discretised_ode_with_the_exact_posterior_reproduces_the_data():
    sigma_1, K = 0.05, 5
    pi = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    fn = lambda mu, t: exact_bin_posterior(mu, t, sigma_1, K, pi.log().double()).float()  # noqa: E731
    x = C.discretised_sample_ode(fn, (40_000, 1), 100, sigma_1, K, generator=gen(63))
    assert_frequencies(C.bin_index(x, K), pi)


# ---------------------------------------------------------------------------------------------------- SDE samplers


@pytest.mark.parametrize("n", [1, 5])
def test_sde_samplers_call_the_network_n_plus_one_times(n):
    K = 3
    cont = Counter(lambda mu, t: torch.zeros_like(mu))
    disc = Counter(lambda mu, t: torch.full(mu.shape + (K,), 1 / K))
    cat = Counter(lambda theta, t: theta)
    traj = []
    x = C.continuous_sample_sde(recorded(cont, traj), (2, 3), n, 0.01, gen())
    C.discretised_sample_sde(disc, (2, 3), n, 0.01, K, gen())
    k = C.discrete_sample_sde(cat, (2, 3), n, 2.0, K, gen())
    for c in (cont, disc, cat):
        assert c.calls == n + 1 and c.ts == pytest.approx([i / n for i in range(n)] + [1.0])
    assert [s["t"] for s in traj] == pytest.approx(cont.ts) and x.shape == k.shape == (2, 3)


def test_continuous_sde_is_algorithm_3_when_the_prediction_does_not_change():
    """With x_hat constant the second-order term vanishes, and each step is Algorithm 3's Bayesian update written in
    closed form: the same noise gives the same mu at every step."""
    fn = lambda mu, t: torch.full_like(mu, 0.3)  # noqa: E731
    paper, sde = [], []
    C.continuous_sample(recorded(fn, paper), (4, 5), 8, 0.01, gen(80))
    C.continuous_sample_sde(recorded(fn, sde), (4, 5), 8, 0.01, gen(80))
    for a, b in zip(paper, sde):
        torch.testing.assert_close(a["input"], b["input"], rtol=1e-5, atol=1e-6)


def test_discrete_sde_with_the_exact_posterior_reproduces_the_data():
    pi = torch.tensor([0.6, 0.25, 0.1, 0.05])
    fn = lambda theta, t: pi * theta / (pi * theta).sum(-1, keepdim=True)  # noqa: E731
    k = C.discrete_sample_sde(fn, (20_000,), 100, 4.0, len(pi), gen(81))
    assert_frequencies(k, pi)


def test_discretised_sde_with_the_exact_posterior_reproduces_the_data():
    sigma_1, K = 0.05, 5
    pi = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    fn = lambda mu, t: exact_bin_posterior(mu, t, sigma_1, K, pi.log().double()).float()  # noqa: E731
    x = C.discretised_sample_sde(fn, (40_000, 1), 100, sigma_1, K, generator=gen(82))
    assert_frequencies(C.bin_index(x, K), pi)


# ---------------------------------------------------------------------------------------------------- precision


def test_one_minus_gamma_and_the_scales_are_exact_in_float32():
    """With sigma_1 = 0.001, gamma is within an ulp of 1 for t >= 0.5: 1 - gamma must come from sigma_1^(2t) itself.
    The flow's std and the x_hat scale sqrt((1 - gamma) / gamma) agree with float64 to 1e-6 relative."""
    sigma_1 = 0.001
    t = torch.linspace(0.01, 1, 100)
    t64 = t.double()
    one_minus_gamma64 = sigma_1 ** (2 * t64)
    gamma64 = 1 - one_minus_gamma64
    noise = torch.randn(100, 1, generator=gen(70))
    std = C.continuous_flow(torch.zeros(100, 1), t, sigma_1, gen(70)) / noise  # x = 0: mu = std z
    torch.testing.assert_close(std[:, 0].double(), (gamma64 * one_minus_gamma64).sqrt(), rtol=1e-6, atol=0)
    late = t >= 0.3  # where sqrt((1 - gamma) / gamma) < 1, so the clip of x_hat to [-1, 1] does not apply
    scale = -C.continuous_x_hat(torch.zeros(100), t, torch.ones(100), sigma_1)
    torch.testing.assert_close(scale[late].double(), (one_minus_gamma64 / gamma64).sqrt()[late], rtol=1e-6, atol=0)
    gamma_early64 = -torch.expm1(torch.tensor([2e-6 * math.log(sigma_1)], dtype=torch.float64))
    gamma_early = C.continuous_gamma(torch.tensor([1e-6]), sigma_1).double()
    torch.testing.assert_close(gamma_early, gamma_early64, rtol=1e-6, atol=0)


def normal_bin_prob64(left, right, mu, sigma):
    """Phi((right - mu) / sigma) - Phi((left - mu) / sigma) in float64 from erfc, from the nearer tail (exact to about
    37 sigma)."""
    a, b = (left - mu) / sigma / math.sqrt(2), (right - mu) / sigma / math.sqrt(2)
    upper = 0.5 * (torch.erfc(a) - torch.erfc(b))
    lower = 0.5 * (torch.erfc(-b) - torch.erfc(-a))
    return torch.where(a > 0, upper, lower)


def test_bin_log_probabilities_are_exact_far_into_the_tails():
    """-ln p_O of a bin up to 30 sigma from the prediction is within 1% of float64 (a float32 CDF difference reads
    87.3 nats for all of them); far bins on both sides, and the clipped edge bins."""
    K, sigma = 256, 0.01
    edges = torch.linspace(-1, 1, K + 1, dtype=torch.float64)
    for mu in [0.0, 0.5, -0.93]:
        log_p = C.discretised_log_probs(torch.tensor([mu]), torch.tensor([sigma]), K)[0].double()
        p64 = normal_bin_prob64(edges[:-1], edges[1:], mu, sigma)
        p64[0] = 0.5 * torch.erfc(-(edges[1] - mu) / sigma / math.sqrt(2))  # the clipped first bin: Phi(k_r)
        p64[-1] = 0.5 * torch.erfc((edges[-2] - mu) / sigma / math.sqrt(2))  # the clipped last bin: 1 - Phi(k_l)
        centres64 = (edges[:-1] + edges[1:]) / 2
        near = (centres64 - mu).abs() <= 30 * sigma
        torch.testing.assert_close(-log_p[near], -p64[near].log(), rtol=0.01, atol=1e-4)
        assert (-log_p[near]).max() > 300  # the far bins really are far
    x = torch.tensor([[0.3 + 30 * 0.001]])  # the continuous output's L^r, 30 std from x_hat = 0.3
    recon = C.continuous_recon_loss(x, torch.tensor([[0.3]]), 0.001, 256)
    k = C.bin_index(x, 256).item()
    expected = -normal_bin_prob64(edges[k], edges[k + 1], 0.3, 0.001).log()
    assert recon.item() == pytest.approx(expected.item(), rel=0.01)


def test_discretised_recon_loss_scores_the_bin_of_x():
    """L^r from x's own bin equals -ln p_O(x) read off all K bins, with x in the clipped edge bins and far from mu_x,
    and the float64 CDF difference where that is exact."""
    g = gen(72)
    for K in [16, 256]:
        x = C.bin_centres(K)[torch.randint(0, K, (40, 3), generator=g)]
        x[0] = torch.tensor([-1.0, 1.0, C.bin_centres(K)[0].item()])  # the edge bins, and -1 itself
        mu_x = x + torch.randn(40, 3, generator=g) * torch.tensor([0.001, 0.1, 3.0])
        sigma_x = torch.rand(40, 3, generator=g) * 0.2 + 0.005
        log_p = C.discretised_log_probs(mu_x, sigma_x, K)
        expected = -log_p.gather(-1, C.bin_index(x, K)[..., None]).sum((1, 2))
        assert torch.equal(C.discretised_recon_loss(x, mu_x, sigma_x, K), expected)
        edges = torch.linspace(-1, 1, K + 1, dtype=torch.float64)
        k = C.bin_index(x, K)[1:]
        p64 = normal_bin_prob64(edges[k], edges[k + 1], mu_x[1:].double(), sigma_x[1:].double())
        p64 = torch.where(k == 0, 0.5 * torch.erfc(-(edges[k + 1] - mu_x[1:]) / sigma_x[1:] / math.sqrt(2)), p64)
        p64 = torch.where(k == K - 1, 0.5 * torch.erfc((edges[k] - mu_x[1:]) / sigma_x[1:] / math.sqrt(2)), p64)
        near = (p64 > 1e-200).all(-1)
        recon = C.discretised_recon_loss(x[1:], mu_x[1:], sigma_x[1:], K)
        torch.testing.assert_close(recon[near].double(), -p64.log().sum(-1)[near], rtol=1e-4, atol=1e-3)


def test_no_finite_network_output_gives_a_nan_or_inf():
    """The discretised output clamps ln sigma_eps and sigma_x as the authors' release does: any finite (mu_eps,
    ln sigma_eps) gives finite log-probabilities that sum to 1, and finite gradients."""
    mu_eps = torch.tensor([0.0, 1e6, -1e6, 3.0, 0.0, 0.0], requires_grad=True)
    log_sigma_eps = torch.tensor([0.0, 0.0, 0.0, 1e6, -1e6, 80.0], requires_grad=True)
    mu, t = torch.full((6,), 0.2), torch.tensor([0.5, 0.5, 0.9, 1.0, 0.3, 1e-3])
    for K in [16, 256]:
        out = C.discretised_output(mu[:, None], t, mu_eps[:, None], log_sigma_eps[:, None], 0.001)
        log_p = C.discretised_log_probs(*out, K)
        assert torch.isfinite(log_p).all()
        torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(6, 1), rtol=1e-4, atol=1e-4)
        x = C.bin_centres(K)[torch.tensor([[3], [0], [K - 1], [5], [7], [2]])]
        (
            C.discretised_recon_loss(x, *out, K).sum()
            + C.discretised_loss_n(x, log_p, torch.tensor([3] * 6), 5, 0.001, gen(71)).sum()
        ).backward()
        assert torch.isfinite(mu_eps.grad).all() and torch.isfinite(log_sigma_eps.grad).all()
        mu_eps.grad, log_sigma_eps.grad = None, None


def test_stratified_times_put_one_t_in_each_stratum_and_each_is_uniform():
    g = torch.Generator().manual_seed(0)
    t = C.training_times(8, True, g)
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))  # one in each eighth of [0, 1)
    assert C.training_times(8, False, g).shape == (8,)
    draws = torch.stack([C.training_times(8, True, g) for _ in range(4000)])  # (4000, 8)
    assert abs(draws[:, 0].mean().item() - 0.5) < 0.02 and abs(draws[:, 0].var().item() - 1 / 12) < 0.005  # U(0, 1)
    assert draws.mean(1).var().item() < 0.1 * (1 / 12 / 8)  # the batch mean: far less variance than independent t


def test_stratified_steps_use_every_step_equally_and_each_is_uniform():
    counts = torch.bincount(C.stratified_steps(7, 100, gen(72)), minlength=8)[1:]
    assert counts.sum() == 100 and counts.max() - counts.min() <= 1  # 100 = 14 x 7 + 2
    first = torch.stack([C.stratified_steps(7, 3, gen(73 + k))[0] for k in range(7000)])  # one example, many draws
    assert_frequencies(first - 1, torch.full((7,), 1 / 7))


def test_the_worked_example_at_the_top_of_common_runs():
    """The docstring's example, as written, with a tiny network of each kind: it trains (a finite loss with gradients)
    and samples (the samplers turn autograd off themselves)."""
    lines = C.__doc__.split("\n")
    start = lines.index("    import torch, common as C")
    code = "\n".join(line[4:] for line in lines[start : lines.index("", start)])
    D, K, sigma_1, beta_1 = 5, 3, 0.01, 2.0
    lin = torch.nn.Linear(D * K + 1, D * K)

    def net(inp, t):  # the continuous network takes mu (B, D); the discrete one 2 theta - 1 (B, D, K)
        flat = inp.flatten(1)
        out = lin(torch.cat([torch.nn.functional.pad(flat, (0, D * K - flat.shape[1])), t[:, None]], 1))
        return out[:, :D] if inp.dim() == 2 else out.view(-1, D, K)

    scope = {
        "net": net,
        "x": torch.rand(8, D) * 2 - 1,
        "k": torch.randint(0, K, (8, D)),
        "D": D,
        "K": K,
        "sigma_1": sigma_1,
        "beta_1": beta_1,
    }
    exec(code, scope)
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert scope["x"].shape == (16, D) and scope["k"].shape == (16, D) and not scope["x"].requires_grad
