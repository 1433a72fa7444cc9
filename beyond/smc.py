"""Conditioning on known values, beyond the paper: replacement and sequential Monte Carlo for the three data types
(the command that uses them: beyond/conditioning.py).

Replacement: at every step the prediction of each known dimension is replaced by its value (x_hat = c, or p_O all on
c), so the known dimensions follow exactly the Bayesian flow of c and the network sees them as in training. Cheap, but
it does not sample p(x_unknown | x_known = c): the unknown dimensions see only the noisy input parameters of the known
ones, and that bias does not vanish as n grows.

Sequential Monte Carlo samples the model's own conditional. A sampler defines a joint distribution of its path and
output, q(y_1..y_n, x) = prod_i r_i(y_i | theta_{i-1}) p_O(x | theta_n, 1), with r_i its transition: the receiver
distribution p_R (§3) for the paper's samplers, a Gaussian for the SDE solver. Conditioning on x_k = c gives the target
    pi(y_1..y_n, x_u) ∝ prod_i r_i(y_i | theta_{i-1}) p_O(c | theta_n, 1) p_O(x_u | theta_n, 1).
The particles move by replacement (r_i on the unknown dimensions; on the known ones the sender p_S(. | c), or the SDE
transition with c as the prediction), and each step multiplies a particle's weight by
    w_i = [r_i(y_i,k | theta_{i-1}) / proposal(y_i,k)] psi_i(theta_i) / psi_{i-1}(theta_{i-1}),
with psi_i(theta) = p_O(c | theta, t_i): the network's own prediction of the known values, at t = 1 the exact final
factor. The product of the w_i is pi / proposal up to a constant whatever psi is in between, so with resampling (when
the effective sample size of an example's particles falls below P / 2) the particles target pi exactly as P grows (Del
Moral, "Feynman-Kac Formulae", 2004); psi decides only how early the particles that will not fit c are dropped. One
particle per example is returned, drawn in proportion to its final weight. p_O enters the weights as the sampler draws
from it: its positive part, normalised. For continuous data p_O is a delta at x_hat, so psi_i = N(c | x_hat(theta_i,
t_i), sigma_1^(2 t_i)): the variance of x given mu for data of unit variance. The ODE solver moves deterministically
after its first draw: it has nothing to reweight, and takes replacement only. Cost: P (n + 1) network calls per
example. With nothing known and P = 1 each SMC sampler is its plain sampler.

Shapes: B examples, P particles per example, D data dimensions ("..."), K classes or bins.
"""

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's root
import common

# ----------------------------------------------------------------------------------------------------------------------
# Replacement, for every sampler: known (B, ...) holds the values, NaN where unknown (continuous and discretised data),
# or classes, -1 where unknown (discrete data).


def replace_known_x_hat(x_hat_fn, known):
    """Continuous data: x_hat_fn with the prediction of each known dimension set to its value."""

    def replaced(mu, t):
        return torch.where(known.isnan(), x_hat_fn(mu, t), known)

    return replaced


def replace_known_probs(probs_fn, known):
    """Discrete and discretised data: probs_fn with p_O of each known dimension all on its class (or bin)."""

    def replaced(inputs, t):
        probs = probs_fn(inputs, t)
        sure = F.one_hot(known.clamp_min(0), probs.shape[-1]).to(probs)
        return torch.where((known >= 0)[..., None], sure, probs)

    return replaced


# ----------------------------------------------------------------------------------------------------------------------
# Sequential Monte Carlo: the parts shared by the three data types.


def sum_dims(v):
    """(B, ...) -> (B,): the sum over the data dimensions."""
    return v.flatten(1).sum(1)


def reweight(log_w, increment, generator=None):
    """One step of sequential importance resampling. log_w (B, P): each example's particles' log-weights; increment
    (B P,): this step's log-factor. Examples whose effective sample size (sum w)^2 / sum w^2 fell below P / 2 are
    resampled (multinomially) and their weights reset. Returns (log_w, rows): rows (B P,) of the batch that carry on."""
    B, P = log_w.shape
    log_w = log_w + increment.view(B, P)
    w = torch.softmax(log_w, -1)
    low = (1 / (w**2).sum(-1) < P / 2)[:, None]  # (B, 1)
    keep = torch.arange(P, device=log_w.device).expand(B, P)
    if low.any():
        keep = torch.where(low, torch.multinomial(w, P, replacement=True, generator=generator), keep)
    first_row = P * torch.arange(B, device=log_w.device)[:, None]
    return torch.where(low, torch.zeros_like(log_w), log_w), (keep + first_row).flatten()


def choose(log_w, generator=None):
    """One particle per example, drawn in proportion to its weight: log_w (B, P) -> (B,) rows of the batch."""
    B, P = log_w.shape
    first_row = P * torch.arange(B, device=log_w.device)
    if P == 1:
        return first_row
    return torch.multinomial(torch.softmax(log_w, -1), 1, generator=generator)[:, 0] + first_row


def log_positive(probs):
    """ln of what common.sample_categorical draws from: the positive part of probs, normalised. (B, ..., K)."""
    positive = probs.clamp_min(0)
    return (positive / positive.sum(-1, keepdim=True)).clamp_min(torch.finfo(probs.dtype).tiny).log()


def known_log_psi(log_probs, k):
    """ln psi: the sum over the known dimensions of ln p_O(k | theta, t). log_probs (B, ..., K); k: -1 where unknown."""
    log_p = log_probs.gather(-1, k.clamp_min(0)[..., None])[..., 0]
    return sum_dims(torch.where(k >= 0, log_p, torch.zeros_like(log_p)))


def gaussian_ratio(eps, delta, scale, on):
    """ln N(y | m + delta, scale^2) - ln N(y | m, scale^2) at y = m + scale eps, summed where on: the log-ratio of a
    Gaussian transition with the model's mean m + delta to the proposal with mean m, at the proposal's draw."""
    return sum_dims(torch.where(on, eps * delta / scale - delta**2 / (2 * scale**2), torch.zeros_like(eps)))


# ----------------------------------------------------------------------------------------------------------------------
# Sequential Monte Carlo for each data type: the paper's sampler (Algorithms 3, 6, 9) or, with sde, the SDE solver of
# common.py, conditioned on known (B, ...), over P = particles per example; the network function as common's samplers.


@torch.no_grad()
def continuous_sample_smc(x_hat_fn, known, n_steps, sigma_1, particles, sde=False, generator=None):
    """Continuous data: known values, NaN where unknown. Returns (B, ...)."""
    B = known.shape[0]
    P = particles
    c = known.repeat_interleave(P, 0)  # (B P, ...)
    on = ~c.isnan()
    c = c.nan_to_num()
    ones = torch.ones(B * P, device=known.device)
    mu = torch.zeros_like(c)
    rho = 1.0
    log_w = torch.zeros(B, P, device=known.device)
    log_psi = 0.0
    log_ratio = 0.0
    previous = None
    for i in range(n_steps + 1):
        t = i / n_steps
        x_hat = x_hat_fn(mu, t * ones).float()
        new_psi = sum_dims(torch.where(on, -((c - x_hat) ** 2) / (2 * sigma_1 ** (2 * t)), torch.zeros_like(x_hat)))
        increment = log_ratio + new_psi - log_psi
        if i == n_steps:
            return torch.where(on, c, x_hat)[choose(log_w + increment.view(B, P), generator)]
        log_w, rows = reweight(log_w, increment, generator)
        mu = mu[rows]
        x_hat = x_hat[rows]
        log_psi = new_psi[rows]
        eps = torch.randn(mu.shape, generator=generator, device=mu.device)
        if sde:  # mu' = decay mu + gain d + scale eps, with c as the prediction on the known dimensions
            if previous is not None:
                previous = (previous[0][rows], previous[1])
            decay, gain, scale = common.sde_coefficients(i, n_steps, sigma_1)
            d = common.sde_prediction(x_hat, previous, i, n_steps, sigma_1)
            mu = decay * mu + gain * torch.where(on, c, d) + scale * eps
            log_ratio = gaussian_ratio(eps, gain * (d - c), scale, on)
            if i > 0:
                previous = (x_hat, i)
        else:  # y ~ N(x_hat, 1/alpha) on the unknown dimensions, the sender N(c, 1/alpha) on the known ones
            alpha = common.continuous_alpha(i + 1, n_steps, sigma_1).item()
            y = torch.where(on, c, x_hat) + eps / math.sqrt(alpha)
            mu, rho = common.continuous_update(mu, rho, y, alpha)
            log_ratio = gaussian_ratio(eps, x_hat - c, 1 / math.sqrt(alpha), on)


@torch.no_grad()
def discretised_sample_smc(probs_fn, known, n_steps, sigma_1, K, particles, sde=False, generator=None):
    """Discretised data: known values, NaN where unknown. Returns the centres of the bins drawn, (B, ...)."""
    B = known.shape[0]
    P = particles
    c = known.repeat_interleave(P, 0)
    on = ~c.isnan()
    k = torch.where(on, common.bin_index(c.nan_to_num(), K), -1)  # the known bins
    c = c.nan_to_num()
    centres = common.bin_centres(K, device=known.device)
    ones = torch.ones(B * P, device=known.device)
    mu = torch.zeros_like(c)
    rho = 1.0
    log_w = torch.zeros(B, P, device=known.device)
    log_psi = 0.0
    log_ratio = 0.0
    previous = None
    for i in range(n_steps + 1):
        t = i / n_steps
        probs = probs_fn(mu, t * ones).float()
        log_p = log_positive(probs)
        used = torch.where(on[..., None], F.one_hot(k.clamp_min(0), K).to(probs), probs)  # sure of the known bins
        new_psi = known_log_psi(log_p, k)
        increment = log_ratio + new_psi - log_psi
        if i == n_steps:
            pick = choose(log_w + increment.view(B, P), generator)
            return centres[common.sample_categorical(used[pick], generator)]
        log_w, rows = reweight(log_w, increment, generator)
        mu = mu[rows]
        log_p = log_p[rows]
        used = used[rows]
        log_psi = new_psi[rows]
        if sde:  # the mean bin k_hat as the prediction, and c on the known dimensions
            if previous is not None:
                previous = (previous[0][rows], previous[1])
            k_hat = (probs[rows] * centres).sum(-1)
            decay, gain, scale = common.sde_coefficients(i, n_steps, sigma_1)
            d = common.sde_prediction(k_hat, previous, i, n_steps, sigma_1)
            eps = torch.randn(mu.shape, generator=generator, device=mu.device)
            mu = decay * mu + gain * torch.where(on, c, d) + scale * eps
            log_ratio = gaussian_ratio(eps, gain * (d - c), scale, on)
            if i > 0:
                previous = (k_hat, i)
        else:  # a bin drawn from p_O, or c; ln p_R(y | theta) - ln N(y | c, 1/alpha) on the known dimensions (§5.4)
            alpha = common.continuous_alpha(i + 1, n_steps, sigma_1).item()
            bins = common.sample_categorical(used, generator)
            y = centres[bins] + torch.randn(mu.shape, generator=generator, device=mu.device) / math.sqrt(alpha)
            mixture = torch.logsumexp(log_p - alpha / 2 * (y[..., None] - centres) ** 2, -1)
            log_ratio = sum_dims(torch.where(on, mixture + alpha / 2 * (y - c) ** 2, torch.zeros_like(y)))
            mu, rho = common.continuous_update(mu, rho, y, alpha)


@torch.no_grad()
def discrete_sample_smc(probs_fn, known, n_steps, beta_1, K, particles, sde=False, generator=None):
    """Discrete data: known classes, -1 where unknown. Returns (B, ...) long."""
    B = known.shape[0]
    P = particles
    k = known.repeat_interleave(P, 0)
    on = (k >= 0)[..., None]
    ones = torch.ones(B * P, device=known.device)
    theta = torch.full((*k.shape, K), 1 / K, device=known.device)
    log_w = torch.zeros(B, P, device=known.device)
    log_psi = 0.0
    log_ratio = 0.0
    previous = None
    for i in range(n_steps + 1):
        t = i / n_steps
        probs = probs_fn(theta, t * ones).float()
        log_p = log_positive(probs)
        used = torch.where(on, F.one_hot(k.clamp_min(0), K).to(probs), probs)  # sure of the known classes
        new_psi = known_log_psi(log_p, k)
        increment = log_ratio + new_psi - log_psi
        if i == n_steps:
            return common.sample_categorical(used[choose(log_w + increment.view(B, P), generator)], generator)
        log_w, rows = reweight(log_w, increment, generator)
        theta = theta[rows]
        probs = probs[rows]
        log_p = log_p[rows]
        used = used[rows]
        log_psi = new_psi[rows]
        alpha = beta_1 * (2 * i + 1) / n_steps**2  # beta(t') - beta(t)
        if sde:  # the mean e_hat with its change over the step, and c on the known dimensions
            if previous is not None:
                previous = (previous[0][rows], previous[1])
            drift = common.discrete_sde_drift(probs, previous, alpha, t, (i + 1) / n_steps, beta_1)
            eps = torch.randn(theta.shape, generator=generator, device=theta.device)
            y = torch.where(on, alpha * (K * used - 1), drift) + math.sqrt(alpha * K) * eps
            log_ratio = gaussian_ratio(eps, drift - alpha * (K * used - 1), math.sqrt(alpha * K), on)
            previous = (probs, t)
        else:  # a class drawn from p_O, or c; ln p_R(y | theta) - ln p_S(y | c) on the known dimensions (§6.6)
            e_k = F.one_hot(common.sample_categorical(used, generator), K).float()
            noise = torch.randn(e_k.shape, generator=generator, device=e_k.device)
            y = alpha * (K * e_k - 1) + math.sqrt(alpha * K) * noise
            to_c = torch.logsumexp(log_p + y, -1) - y.gather(-1, k.clamp_min(0)[..., None])[..., 0]
            log_ratio = sum_dims(torch.where(k >= 0, to_c, torch.zeros_like(to_c)))
        theta = common.discrete_update(theta, y)
