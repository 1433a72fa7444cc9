"""The math of Bayesian Flow Networks: A. Graves, R. K. Srivastava, T. Atkinson, F. Gomez, "Bayesian Flow Networks",
arXiv:2308.07037. Pure functions of tensors, in the paper's order and symbols: continuous data (§4), discretised data
(§5), discrete data (§6), the paper's samplers (Algorithms 3, 6, 9), then fast ODE and SDE samplers. No classes, no
state, no I/O; torch alone. Copy this file and use it with a network of your own:

    import torch, common as C
    # continuous data x (B, D) in [-1, 1]; the network predicts the noise (Algorithm 2)
    t = torch.rand(len(x))
    mu = C.continuous_flow(x, t, sigma_1)                          # mu ~ p_F(. | x; t)
    x_hat = C.continuous_x_hat(mu, t, net(mu, t), sigma_1)         # the output, clipped to [-1, 1]
    C.continuous_loss_inf(x, x_hat, t, sigma_1).mean().backward()  # L^inf in nats per example
    # discrete data k (B, D) in 0..K-1; the network gives K logits per dimension (Algorithm 8)
    theta = C.discrete_flow(k, t, beta_1, K)                       # theta ~ p_F(. | k; t), (B, D, K)
    probs = torch.softmax(net(2 * theta - 1, t), -1)               # p_O(. | theta, t)
    C.discrete_loss_inf(k, probs, t, beta_1).mean().backward()
    # sampling, Algorithms 3 and 9 (the samplers turn autograd off themselves)
    x = C.continuous_sample(lambda mu, t: C.continuous_x_hat(mu, t, net(mu, t), sigma_1), (16, D), 100, sigma_1)
    k = C.discrete_sample(lambda th, t: torch.softmax(net(2 * th - 1, t), -1), (16, D), 100, beta_1, K)

References. Sections (§) and Algorithms are numbered alike in every version of the paper; equation numbers moved
between versions, so each is given with its version, as "arXiv:2308.07037v2, eq. (N)" (v2 for short). The results
that are not in the paper (the exact discrete L^n, the ODE and SDE samplers) carry their derivation here.

Conventions
    B batch, D data dimensions (any trailing shape "..."), K bins or classes.
    x       (B, ...)     continuous / discretised data: floats in [-1, 1]; discrete data: class indices (long)
    t       (B,)         time in [0, 1], broadcast over the data dimensions
    i, n    (B,), int    step index i in 1..n of an n-step discrete-time process; t_{i-1} = (i - 1) / n
    mu, rho              input mean (B, ...) and precision (a scalar or (B,), the same for every dimension)
    theta   (B, ..., K)  input probabilities of discrete data
    probs   (B, ..., K)  output probabilities p_O: what L^inf and the samplers take, because they use expectations
                         and draws, where a probability too small for float32 counts for nothing
    log_probs (B, ..., K) ln p_O computed in log space: what L^n and L^r take, because they score the data, and a
                         confident wrong prediction must cost its true -ln p, not the 87.3 nats of a float32 0
    losses  (B,)         in nats, summed over the data dimensions (divide by D ln 2 for bits/dim)
The stochastic losses are unbiased one-sample estimates of the paper's expectations. The math runs in float32
(float64 if the inputs are float64), also inside torch.autocast. Quantities that cancel in float32 come from their own
closed forms: 1 - gamma as sigma_1^(2t), gamma as -expm1(2t ln sigma_1). Every random draw takes an optional
torch.Generator.
"""

import math

import torch
import torch.nn.functional as F


def _full_precision(x):
    """x in float32, or float64 if it already is: the math never runs in half precision."""
    return x if x.dtype == torch.float64 else x.float()


def _per_example(t, x):
    """(B,) -> (B, 1, ..., 1), to broadcast a per-example quantity over x's data dimensions."""
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - t.dim()))


def _sum_dims(v):
    """(B, ...) -> (B,): sum over the data dimensions."""
    return v.flatten(1).sum(1)


def _randn_like(x, generator=None):
    """Standard normal noise of x's shape, dtype and device, from an optional generator."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------
# §4 Continuous data (Algorithms 1-3). Input N(mu, 1/rho), sender N(x, 1/alpha), schedule from sigma_1.
# beta(t) = sigma_1^(-2t) - 1 (v2, eq. (72)) and alpha(t) = -2 ln(sigma_1) sigma_1^(-2t) (v2, eq. (74)).


def continuous_gamma(t, sigma_1):
    """§4.5, arXiv:2308.07037v2, eq. (80): gamma(t) = beta(t) / (1 + beta(t)) = 1 - sigma_1^(2t), computed as
    -expm1(2t ln sigma_1), which keeps its digits near t = 0."""
    return -torch.expm1(2 * _full_precision(torch.as_tensor(t)) * math.log(sigma_1))


def continuous_one_minus_gamma(t, sigma_1):
    """1 - gamma(t) = sigma_1^(2t), from its own closed form: in float32, 1 - gamma rounds away its digits once gamma is
    near 1 (for sigma_1 = 0.001 and t >= 0.5 the flow's std would be up to 1.4% off)."""
    return sigma_1 ** (2 * _full_precision(torch.as_tensor(t)))


def continuous_alpha(i, n, sigma_1):
    """§4.7, v2 eq. (95): the accuracy of step i of n,
    alpha_i = beta(t_i) - beta(t_{i-1}) = sigma_1^(-2i/n) (1 - sigma_1^(2/n))."""
    i = _full_precision(torch.as_tensor(i))
    return sigma_1 ** (-2 * i / n) * (1 - sigma_1 ** (2 / n))


def continuous_update(mu, rho, y, alpha):
    """§4.2, v2 eqs. (49)-(50), Bayesian update: rho' = rho + alpha, mu' = (rho mu + alpha y) / rho'.
    Returns (mu', rho')."""
    alpha = _per_example(alpha, mu) if torch.is_tensor(alpha) else alpha
    rho = _per_example(rho, mu) if torch.is_tensor(rho) else rho
    rho_new = rho + alpha
    return (rho * mu + alpha * y) / rho_new, rho_new


def continuous_flow(x, t, sigma_1, generator=None):
    """§4.5, v2 eq. (77), Bayesian flow distribution: mu ~ p_F(mu | x; t) = N(gamma x, gamma (1 - gamma)).
    x (B, ...) -> mu (B, ...)."""
    x = _full_precision(x)
    gamma = _per_example(continuous_gamma(t, sigma_1), x)
    one_minus_gamma = _per_example(continuous_one_minus_gamma(t, sigma_1), x)
    return gamma * x + (gamma * one_minus_gamma).sqrt() * _randn_like(x, generator)


def continuous_x_hat(mu, t, eps_hat, sigma_1, t_min=1e-6):
    """§4.6, v2 eq. (84), output from the predicted noise eps_hat (B, ...): x_hat = mu / gamma - sqrt((1 - gamma) /
    gamma) eps_hat, clipped to [-1, 1]; 0 for t < t_min (Algorithm 1). gamma at max(t, t_min): the branch torch.where
    drops stays finite and back-propagates zeros, not NaNs."""
    mu = _full_precision(mu)
    eps_hat = _full_precision(eps_hat)
    t = _per_example(_full_precision(torch.as_tensor(t)), mu)
    gamma = continuous_gamma(t.clamp_min(t_min), sigma_1)
    x_hat = mu / gamma - (continuous_one_minus_gamma(t.clamp_min(t_min), sigma_1) / gamma).sqrt() * eps_hat
    return torch.where(t < t_min, torch.zeros_like(x_hat), x_hat.clamp(-1, 1))


def continuous_loss_n(x, x_hat, i, n, sigma_1):
    """§4.10, v2 eq. (96), discrete-time loss (Algorithm 1):
    L^n(x) = (n / 2) alpha_i ||x - x_hat(theta_{i-1}, t_{i-1})||^2. Returns (B,).

    The caller draws i ~ U{1..n}, mu ~ p_F(. | x; t_{i-1}) and evaluates x_hat at t_{i-1} = (i - 1) / n."""
    alpha = continuous_alpha(i, n, sigma_1)
    return n / 2 * alpha * _sum_dims((_full_precision(x) - _full_precision(x_hat)) ** 2)


def continuous_loss_inf(x, x_hat, t, sigma_1):
    """§4.12, v2 eq. (101), continuous-time loss (Algorithm 2): L^inf(x) = -ln(sigma_1) sigma_1^(-2t) ||x - x_hat||^2,
    t ~ U(0, 1); the factor is alpha(t) / 2. Returns (B,)."""
    t = _full_precision(torch.as_tensor(t))
    return -math.log(sigma_1) * sigma_1 ** (-2 * t) * _sum_dims((_full_precision(x) - _full_precision(x_hat)) ** 2)


def continuous_recon_loss(x, x_hat, std, K):
    """§4.13, reconstruction loss L^r(x) = -ln p_O(x | theta, 1) for data in K = K bins. The delta output of
    §4.6 cannot score data, so, as the authors' release does, x is scored under N(x_hat, std^2) discretised to the
    bins with clipped tails (the §5.2 construction). Returns (B,)."""
    x = _full_precision(x)
    x_hat = _full_precision(x_hat)
    k = bin_index(x, K).to(x.dtype)
    left = 2 * k / K - 1  # the edges of x's bin
    right = 2 * (k + 1) / K - 1
    return -_sum_dims(_log_bin_prob(left, right, x_hat, torch.as_tensor(std, dtype=x.dtype, device=x.device)))


# ----------------------------------------------------------------------------------------------------
# §5 Discretised data (Algorithms 4-6). K bins of width 2/K on [-1, 1]; input, sender, update and flow as §4.


def bin_centres(K, device=None):
    """§5.1: k_c = (2k - 1) / K - 1 for k = 1..K. Returns (K,)."""
    k = torch.arange(1, K + 1, device=device, dtype=torch.float32)
    return (2 * k - 1) / K - 1


def bin_index(x, K):
    """The 0-based bin of each x in [-1, 1] (the k - 1 of §5.1). (B, ...) -> (B, ...) long."""
    return ((_full_precision(x) + 1) * K / 2).floor().long().clamp(0, K - 1)


def _log_bin_prob(left, right, mu_x, sigma_x):
    """§5.2 in log space: ln [G(right) - G(left)] for G the Normal(mu_x, sigma_x) CDF clipped to 0 at z <= -1 and to 1
    at z >= 1, so the first and last bins absorb the tails. A difference of two CDFs underflows in float32 a few
    standard deviations out (and -ln p would read 87.3 however far away x is); here each bin is measured from the
    nearer tail with log_ndtr, ln [Phi(b) - Phi(a)] = ln Phi(b) + ln(-expm1(ln Phi(a) - ln Phi(b))), so it stays
    within float32 rounding of the float64 value. Broadcasts; returns the shape of the broadcast inputs."""
    # beyond 1000 standard deviations a bin's probability is 0 to any precision (ln p < -5e5), and log_ndtr's gradient
    # is no longer finite far beyond: the clamp keeps every value and gradient finite
    z_left = ((left - mu_x) / sigma_x).clamp(-1e3, 1e3)
    z_right = ((right - mu_x) / sigma_x).clamp(-1e3, 1e3)
    first = left <= -1  # the clipped bins: G(left) = 0,
    last = right >= 1  # or G(right) = 1
    z_left = torch.where(first, z_right - 1, z_left)  # finite stand-ins where a clipped end is not used,
    z_right = torch.where(last, z_left + 1, z_right)  # so that no branch creates an inf or a NaN gradient
    upper = z_left > 0  # both ends above the mean: measure from the upper tail, Phi(-z_left) - Phi(-z_right)
    a = torch.where(upper, -z_right, z_left)  # a < b, a <= 0
    b = torch.where(upper, -z_left, z_right)
    log_a = torch.special.log_ndtr(a)
    log_b = torch.special.log_ndtr(b)
    interior = log_b + torch.log(-torch.expm1((log_a - log_b).clamp_max(-1e-30)))  # the clamp: a == b after rounding
    edge = torch.where(first, torch.special.log_ndtr(z_right), torch.special.log_ndtr(-z_left))
    return torch.where(first | last, edge, interior)


def discretised_probs(mu_x, sigma_x, K):
    """§5.2, arXiv:2308.07037v2, eq. (108): p_O(k) = G(k_r) - G(k_l), G the Normal(mu_x, sigma_x) CDF clipped to 0 at
    -1 and 1 at 1, so the end bins absorb the tails. A plain CDF difference, for sampling: it underflows in the far
    tails, so scoring data (L^n, L^r) uses discretised_log_probs. (B, ...) -> (B, ..., K)."""
    mu_x = _full_precision(mu_x)[..., None]
    sigma_x = _full_precision(torch.as_tensor(sigma_x, device=mu_x.device))[..., None]
    edges = torch.linspace(-1, 1, K + 1, device=mu_x.device, dtype=mu_x.dtype)
    cdf = torch.special.ndtr((edges - mu_x) / sigma_x)  # (B, ..., K + 1)
    cdf = torch.where(edges <= -1, 0.0, torch.where(edges >= 1, 1.0, cdf))  # clipped
    return (cdf[..., 1:] - cdf[..., :-1]).clamp_min(0)


def discretised_log_probs(mu_x, sigma_x, K):
    """§5.2, arXiv:2308.07037v2, eq. (108): ln p_O(k) = ln [G(k_r) - G(k_l)] with G the clipped Normal(mu_x, sigma_x)
    CDF, so the first and last bins absorb the tails and the K probabilities sum to 1; in log space, exact far into
    the tails (see _log_bin_prob). (B, ...) -> (B, ..., K)."""
    mu_x = _full_precision(mu_x)[..., None]
    sigma_x = _full_precision(torch.as_tensor(sigma_x, device=mu_x.device))[..., None]
    edges = torch.linspace(-1, 1, K + 1, device=mu_x.device, dtype=mu_x.dtype)
    return _log_bin_prob(edges[:-1], edges[1:], mu_x, sigma_x)


def discretised_output(mu, t, mu_eps, log_sigma_eps, sigma_1, t_min=1e-6, sigma_x_range=(1e-3, 10.0)):
    """§5.3: mu_x = mu / gamma - sqrt((1 - gamma) / gamma) mu_eps, sigma_x = sqrt((1 - gamma) / gamma) exp(ln
    sigma_eps); mu_x = 0, sigma_x = 1 for t < t_min. Returns (mu_x, sigma_x), each (B, ...): p_O is
    discretised_probs(mu_x, sigma_x, K), or in log space discretised_log_probs(mu_x, sigma_x, K).

    As the authors' released models were trained (not in the paper): ln sigma_eps is clamped to [-10, 10] before the
    exp, and sigma_x to sigma_x_range = [1e-3, 10]. This bounds how sharp or flat p_O can be, so that no finite
    network output gives an inf or a NaN, and their checkpoints score as they did for them."""
    mu = _full_precision(mu)
    mu_eps = _full_precision(mu_eps)
    log_sigma_eps = _full_precision(log_sigma_eps)
    t = _per_example(_full_precision(torch.as_tensor(t)), mu)
    gamma = continuous_gamma(t.clamp_min(t_min), sigma_1)
    scale = (continuous_one_minus_gamma(t.clamp_min(t_min), sigma_1) / gamma).sqrt()
    small = t < t_min
    mu_x = torch.where(small, torch.zeros_like(mu), mu / gamma - scale * mu_eps)
    sigma_x = (scale * log_sigma_eps.clamp(-10, 10).exp()).clamp(*sigma_x_range)
    sigma_x = torch.where(small, torch.ones_like(mu), sigma_x)
    return mu_x, sigma_x


def discretised_loss_n(x, log_probs, i, n, sigma_1, generator=None):
    """§5.4, discrete-time loss (Algorithm 4), by Monte Carlo over one sender sample y ~ N(x, 1/alpha_i):
    L^n(x) = n [ln N(y | x, 1/alpha_i) - ln sum_k p_O(k | theta_{i-1}, t_{i-1}) N(y | k_c, 1/alpha_i)]. Returns (B,)."""
    x = _full_precision(x)
    log_probs = _full_precision(log_probs)
    alpha = _per_example(continuous_alpha(i, n, sigma_1), x)
    y = x + _randn_like(x, generator) / alpha.sqrt()
    centres = bin_centres(log_probs.shape[-1], device=x.device).to(x.dtype)
    # ln N(y | m, 1/alpha) up to the constant ln sqrt(alpha / 2 pi), which cancels between sender and receiver
    log_sender = -alpha / 2 * (y - x) ** 2
    log_receiver = torch.logsumexp(log_probs - alpha[..., None] / 2 * (y[..., None] - centres) ** 2, -1)
    return n * _sum_dims(log_sender - log_receiver)


def discretised_k_hat(mu_x, sigma_x, K):
    """§5.5: k_hat = sum_k p_O(k) k_c, the mean bin of §5.2's clipped discretised Normal(mu_x, sigma_x), summed by
    parts: 1 - 1/K - (2/K) sum_j Phi((e_j - mu_x) / sigma_x) over the K - 1 inner edges e_j, so one CDF per edge and
    no K probabilities to form (at K = 256 that halves a small network's training step). (B, ...) -> (B, ...)."""
    mu_x = _full_precision(mu_x)[..., None]
    sigma_x = _full_precision(torch.as_tensor(sigma_x, device=mu_x.device))[..., None]
    inner_edges = torch.linspace(-1, 1, K + 1, device=mu_x.device, dtype=mu_x.dtype)[1:-1]
    return 1 - 1 / K - 2 / K * torch.special.ndtr((inner_edges - mu_x) / sigma_x).sum(-1)


def discretised_loss_inf(x, k_hat, t, sigma_1):
    """§5.5, continuous-time loss (Algorithm 5): L^inf(x) = -ln(sigma_1) sigma_1^(-2t) ||x - k_hat(theta, t)||^2,
    with k_hat = sum_k p_O(k | theta, t) k_c (discretised_k_hat for §5.2's p_O): §4.12's, with k_hat. Returns (B,)."""
    return continuous_loss_inf(x, k_hat, t, sigma_1)


def discretised_recon_loss(x, mu_x, sigma_x, K):
    """§5.6: L^r(x) = -ln p_O(x | theta, 1) summed over dimensions, p_O at the bin of x alone. (B, ...) -> (B,)."""
    mu_x = _full_precision(mu_x)
    edges = torch.linspace(-1, 1, K + 1, device=mu_x.device, dtype=mu_x.dtype)
    k = bin_index(x, K)
    return -_sum_dims(_log_bin_prob(edges[k], edges[k + 1], mu_x, sigma_x))


# ----------------------------------------------------------------------------------------------------
# Random times t for L^inf and steps i for L^n (all data types)


def training_times(count, stratified=False, generator=None, device=None):
    """t ~ U(0, 1) for each of `count` examples of a training batch. stratified (beyond the paper): one t in each of
    `count` equal strata of [0, 1), in a random order; each is still U(0, 1), and the batch mean has less variance."""
    u = torch.rand(count, generator=generator, device=device)
    if not stratified:
        return u
    strata = torch.randperm(count, generator=generator, device=device)
    return (strata + u) / count


def stratified_steps(n, count, generator=None, device=None):
    """Step indices i in 1..n for `count` examples, for an L^n estimate: every step is used floor(count / n) or
    ceil(count / n) times, in a random order. Each i is still uniform on 1..n (so the estimate stays unbiased), and
    the estimate has less variance than with independent draws of i. Returns (count,) long."""
    perm = torch.randperm(n, generator=generator, device=device)
    return perm[torch.arange(count, device=device) % n] + 1


# ----------------------------------------------------------------------------------------------------
# §6 Discrete data (Algorithms 7-9). Input: categorical theta; sender N(alpha (K e_x - 1), alpha K I).


def discrete_beta(t, beta_1):
    """§6.8, arXiv:2308.07037v2, eq. (182): beta(t) = beta(1) t^2 (and alpha(t) = 2 beta(1) t, eq. (183))."""
    return beta_1 * _full_precision(torch.as_tensor(t)) ** 2


def discrete_alpha(i, n, beta_1):
    """§6.8: alpha_i = beta(t_i) - beta(t_{i-1}) = beta(1) (2i - 1) / n^2."""
    return beta_1 * (2 * _full_precision(torch.as_tensor(i)) - 1) / n**2


def discrete_update(theta, y):
    """§6.2, Bayesian update: theta' = e^y theta / sum_k e^{y_k} theta_k, as softmax(ln theta + y) in float32 (float64
    if theta is), an underflowed theta_k counting as the smallest positive float. (B, ..., K)."""
    theta = theta if theta.dtype == torch.float64 else theta.float()
    return torch.softmax(theta.clamp_min(torch.finfo(theta.dtype).tiny).log() + y, -1)


def discrete_flow(x, t, beta_1, K, generator=None):
    """§6.3, Bayesian flow distribution: theta = softmax(y), y ~ N(beta(t) (K e_x - 1), beta(t) K I).
    x (B, ...) long -> theta (B, ..., K)."""
    e_x = torch.nn.functional.one_hot(x, K).float()
    beta = _per_example(discrete_beta(t, beta_1), e_x)
    y = beta * (K * e_x - 1) + (beta * K).sqrt() * _randn_like(e_x, generator)
    return torch.softmax(y, -1)


def discrete_loss_n(x, log_probs, i, n, beta_1, generator=None):
    """§6.6, v2 eqs. (189)-(190), discrete-time loss (Algorithm 7) with the exact K-dimensional receiver mixture,
    by Monte Carlo over y ~ p_S(. | x; alpha_i):
    L^n(x) = n [ln p_S(y | x; alpha_i) - ln sum_k p_O(k | theta_{i-1}, t_{i-1}) p_S(y | k; alpha_i)]. Returns (B,).

    Derivation of the closed form used here (not in the paper). With p_S(y | k) = N(y | alpha (K e_k - 1), alpha K I),
        ln p_S(y | k) = -|y - alpha (K e_k - 1)|^2 / (2 alpha K) + const
                      = y_k - (|y|^2 + 2 alpha sum_j y_j + alpha^2 |K e_k - 1|^2) / (2 alpha K) + const,
    and |K e_k - 1|^2 = (K - 1)^2 + (K - 1) = K (K - 1) is the same for every k, so ln p_S(y | k) = c(y) + y_k with
    c(y) free of k.
    So ln p_S(y | x) - ln sum_k p_O(k) p_S(y | k) = y_x - logsumexp_k (ln p_O(k) + y_k): c(y) cancels exactly.
    A receiver factorised per coordinate (as in the authors' release) is a different, looser quantity. The tests
    check this function against the mixture density written out with torch.distributions.Normal."""
    log_probs = _full_precision(log_probs)
    K = log_probs.shape[-1]
    e_x = torch.nn.functional.one_hot(x, K).to(log_probs.dtype)
    alpha = _per_example(discrete_alpha(i, n, beta_1), e_x)
    y = alpha * (K * e_x - 1) + (alpha * K).sqrt() * _randn_like(e_x, generator)  # (B, ..., K)
    y_x = (y * e_x).sum(-1)
    return n * _sum_dims(y_x - torch.logsumexp(log_probs + y, -1))


def discrete_loss_inf(x, probs, t, beta_1):
    """§6.7, v2 eq. (205), continuous-time loss (Algorithm 8): L^inf(x) = K beta(1) t ||e_x - e_hat(theta, t)||^2,
    with e_hat = sum_k p_O(k) e_k = probs. Summed over the K classes and the data dimensions. Returns (B,)."""
    probs = _full_precision(probs)
    K = probs.shape[-1]
    e_x = torch.nn.functional.one_hot(x, K).to(probs.dtype)
    t = _full_precision(torch.as_tensor(t, device=probs.device))
    return K * beta_1 * t * _sum_dims((e_x - probs) ** 2)


def discrete_recon_loss(x, log_probs):
    """§6.9, reconstruction loss: L^r(x) = -ln p_O(x | theta, 1), summed over dimensions.
    log_probs (B, ..., K) -> (B,)."""
    return -_sum_dims(_full_precision(log_probs).gather(-1, x[..., None]).squeeze(-1))


# ======================================================================================================================
# Generation: Algorithms 3, 6 and 9 as the paper writes them. A sampler takes the network as a function of the input
# parameters and t: x_hat_fn(mu, t) -> x_hat (continuous data), probs_fn(mu, t) -> p_O (B, ..., K) over the K bins
# (discretised data), probs_fn(theta, t) -> p_O (B, ..., K) (discrete data). It calls it n + 1 times, at t = 0, 1/n,
# ..., (n - 1)/n and 1, under torch.no_grad() (a function that needs gradients turns them on itself). It takes
# probabilities, not log-probabilities: it draws from p_O, where a probability too small for float32 counts for
# nothing. Like the paper's algorithms, the samplers end with a draw of p_O(. | theta, 1) (the authors' code returns
# its mode). Algorithm 9 needs discrete_sample, discrete_update and sample_categorical, nothing else of this file.


def sample_categorical(probs, generator=None):
    """k ~ Categorical(probs) over the last axis by inversion of the CDF; probs need not be normalised, and negative
    entries (a guided prediction off the simplex) count as 0. (B, ..., K) -> (B, ...) long."""
    cdf = probs.clamp_min(0).cumsum(-1)
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device, dtype=probs.dtype)
    return (cdf <= u * cdf[..., -1:]).sum(-1).clamp_max(probs.shape[-1] - 1)  # <=: a class of probability 0 is skipped


@torch.no_grad()
def continuous_sample(x_hat_fn, shape, n_steps, sigma_1, generator=None, device=None):
    """§4, Algorithm 3. x_hat_fn(mu (B, ...), t (B,)) -> x_hat (B, ...). Returns OUTPUT(mu, 1), (B, ...)."""
    mu = torch.zeros(shape, device=device)
    rho = 1.0
    for i in range(1, n_steps + 1):
        t = torch.full(shape[:1], (i - 1) / n_steps, device=device)  # t_{i-1}
        x_hat = x_hat_fn(mu, t)
        alpha = continuous_alpha(i, n_steps, sigma_1).item()
        y = x_hat + torch.randn(shape, generator=generator, device=device) / math.sqrt(alpha)  # y ~ N(x_hat, 1/alpha)
        mu, rho = continuous_update(mu, rho, y, alpha)
    return x_hat_fn(mu, torch.ones(shape[:1], device=device))


@torch.no_grad()
def discretised_sample(probs_fn, shape, n_steps, sigma_1, K, generator=None, device=None):
    """§5, Algorithm 6: as Algorithm 3, but each step draws a bin k ~ p_O(. | theta, t_{i-1}) and sends y ~ N(k_c,
    1/alpha_i). probs_fn(mu (B, ...), t (B,)) -> p_O (B, ..., K). Returns the centre of a bin k ~ p_O(. | theta, 1)."""
    mu = torch.zeros(shape, device=device)
    rho = 1.0
    centres = bin_centres(K, device=device)
    for i in range(1, n_steps + 1):
        t = torch.full(shape[:1], (i - 1) / n_steps, device=device)  # t_{i-1}
        k = sample_categorical(probs_fn(mu, t), generator)  # k ~ p_O(. | theta, t_{i-1})
        alpha = continuous_alpha(i, n_steps, sigma_1).item()
        y = centres[k] + torch.randn(shape, generator=generator, device=device) / math.sqrt(alpha)
        mu, rho = continuous_update(mu, rho, y, alpha)
    return centres[sample_categorical(probs_fn(mu, torch.ones(shape[:1], device=device)), generator)]


@torch.no_grad()
def discrete_sample(probs_fn, shape, n_steps, beta_1, K, generator=None, device=None):
    """§6, Algorithm 9. probs_fn(theta (B, ..., K), t (B,)) -> p_O (B, ..., K). Returns k ~ p_O(. | theta, 1),
    (B, ...) long."""
    theta = torch.full((*shape, K), 1 / K, device=device)
    for i in range(1, n_steps + 1):
        t = torch.full(shape[:1], (i - 1) / n_steps, device=device)  # t_{i-1}
        k = sample_categorical(probs_fn(theta, t), generator)  # k ~ p_O(. | theta, t_{i-1})
        alpha = beta_1 * (2 * i - 1) / n_steps**2  # alpha_i = beta(t_i) - beta(t_{i-1}) (§6.8)
        e_k = F.one_hot(k, K).float()
        y = alpha * (K * e_k - 1) + math.sqrt(alpha * K) * torch.randn(e_k.shape, generator=generator, device=device)
        theta = discrete_update(theta, y)  # theta <- e^y theta / sum_k e^{y_k} theta_k
    return sample_categorical(probs_fn(theta, torch.ones(shape[:1], device=device)), generator)


# ----------------------------------------------------------------------------------------------------------------------
# Fast sampling, beyond the paper: the probability-flow ODE of the Bayesian flow. K. Xue, Y. Zhou, S. Nie, X. Min,
# X. Zhang, J. Zhou, C. Li, "Unifying Bayesian Flow Networks and Diffusion Models through Stochastic Differential
# Equations", ICML 2024, arXiv:2404.15766, show that the paper's samplers discretise a reverse-time SDE whose
# marginals are the Bayesian flow p_F(theta | x; t), and that the matching probability-flow ODE can be solved in few
# steps. The derivations used here are written out in full, so that this file stands on its own.
#
# Both cases rest on one fact: if a state moves along u_t = a(t) x + z with z ~ N(0, I) fixed (each x, z a straight
# or curved path), its marginal law is transported by the ODE du/dt = a'(t) E[x | u_t] (the velocity of the path,
# averaged over the data given the state: the flow-matching argument). The network supplies E[x | u_t].
#
# Continuous and discretised data. The flow is mu_t = gamma x + sqrt(gamma (1 - gamma)) z (§4.5), so
# v = mu / sqrt(gamma (1 - gamma)) = s x + z with s(t) = sqrt(gamma / (1 - gamma)) = sqrt(beta(t)), and dv/ds = x_hat
# with x_hat = E[x | mu, t]; sampling starts from v = z at t = 0. Holding x_hat fixed over a step gives the exact
# first-order step v' = v + (s(t') - s(t)) x_hat (DDIM-like); order 2 extrapolates x_hat linearly in lambda = ln s to
# the middle of the step from the previous prediction (as DPM-Solver++(2M), Lu et al. 2022, arXiv:2211.01095).
#
# Discrete data. The flow's logits are y_t = beta(t) (K e_x - 1) + sqrt(beta(t) K) z (§6.3), theta = softmax(y). With
# beta(t) = beta(1) t^2, u = y / t = beta(1) t (K e_x - 1) + sqrt(beta(1) K) z, so du/dt = beta(1) (K e_hat - 1) with
# e_hat = E[e_x | theta, t], the network's output probabilities; sampling starts from u = sqrt(beta(1) K) z at t = 0.
# A first-order step is u' = u + beta(1) (K e_hat - 1) (t' - t); order 2 extrapolates e_hat linearly in t
# (Adams-Bashforth).
#
# The first step. At t = 0 the input carries no information, so the first network call is made at the middle of the
# first step instead, on the state of t = 0 (for continuous data the network's x_hat is 0 at t = 0, so this is the
# first-order state there; for discrete data it takes e_hat = 1/K). For continuous data that state is only an
# approximation at the midpoint, and extrapolating from its prediction, in lambda, where steps near t = 0 are long,
# amplifies the error (exact-posterior tests, tests/test_samplers.py): there the second step is first order and order
# 2 starts at the third. For discrete data, in t, the extrapolation from the midpoint measured better than a
# first-order second step, and is kept. n_steps + 1 network calls, as the paper's samplers; deterministic given the
# initial noise.


def _beta(t, sigma_1):
    """beta(t) = sigma_1^(-2t) - 1 (§4.5) as a float, from expm1 so that it keeps its digits near t = 0. The flow of
    mu in these terms: gamma = beta / (1 + beta), its signal-to-noise ratio s = sqrt(beta), lambda = ln s, and its
    noise std sqrt(gamma (1 - gamma)) = sqrt(beta) / (1 + beta)."""
    return math.expm1(-2 * t * math.log(sigma_1))


def _flow_std(t, sigma_1):
    """sqrt(gamma (1 - gamma)) at t: the std of mu ~ p_F(. | x; t) per unit of noise."""
    beta = _beta(t, sigma_1)
    return math.sqrt(beta) / (1 + beta)


def _continuous_ode(pred_fn, shape, n_steps, sigma_1, order, generator, device):
    """mu_t = gamma x + sqrt(gamma (1 - gamma)) z is a VP diffusion whose signal-to-noise ratio is s = sqrt(beta(t)).
    In v = mu / sqrt(gamma (1 - gamma)) the ODE is dv = x_hat ds, started at v = z when t = 0; a step with the
    prediction held fixed is v' = v + (s(t') - s(t)) x_hat. pred_fn(mu, t) -> the prediction. Returns mu at t = 1."""
    t = [i / n_steps for i in range(n_steps + 1)]
    s = [math.sqrt(_beta(t_i, sigma_1)) for t_i in t]
    v = torch.randn(shape, generator=generator, device=device)
    ones = torch.ones(shape[0], device=device)
    previous = None  # (the last prediction, its lambda)
    for i in range(n_steps):
        t_eval = t[i]
        if i == 0:  # the first call where s is half its value at t_1 (beta = s^2 = (1 + beta) - 1), on v at t = 0
            t_eval = math.log1p(s[1] ** 2 / 4) / (-2 * math.log(sigma_1))
        pred = pred_fn(_flow_std(t_eval, sigma_1) * v, t_eval * ones)
        lam = 0.5 * math.log(_beta(t_eval, sigma_1))  # lambda = ln s, the log signal-to-noise ratio
        d = pred
        if order == 2 and previous is not None:  # x_hat extrapolated to the middle of the step, linearly in lambda
            d = pred + (pred - previous[0]) * (math.log(s[i + 1]) - lam) / (2 * (lam - previous[1]))
        if i > 0:  # the second step is first order (see "The first step")
            previous = (pred, lam)
        v = v + (s[i + 1] - s[i]) * d
    return _flow_std(1.0, sigma_1) * v


@torch.no_grad()
def continuous_sample_ode(x_hat_fn, shape, n_steps, sigma_1, order=2, generator=None, device=None):
    """Continuous data (§4), the probability-flow ODE solver. x_hat_fn as in continuous_sample; returns x_hat(mu,
    1)."""

    def x_hat_in_float32(mu, t):
        return _full_precision(x_hat_fn(mu, t))

    mu = _continuous_ode(x_hat_in_float32, shape, n_steps, sigma_1, order, generator, device)
    return x_hat_in_float32(mu, torch.ones(shape[0], device=device))


@torch.no_grad()
def discretised_sample_ode(probs_fn, shape, n_steps, sigma_1, K, order=2, generator=None, device=None):
    """Discretised data (§5), the probability-flow ODE solver with the mean bin k_hat as the prediction; returns the
    centre of a bin drawn from p_O(. | theta, 1). probs_fn as in discretised_sample."""
    centres = bin_centres(K, device=device)

    def k_hat(mu, t):
        return (_full_precision(probs_fn(mu, t)) * centres).sum(-1)

    mu = _continuous_ode(k_hat, shape, n_steps, sigma_1, order, generator, device)
    probs = _full_precision(probs_fn(mu, torch.ones(shape[0], device=device)))
    return centres[sample_categorical(probs, generator)]


@torch.no_grad()
def discrete_sample_ode(probs_fn, shape, n_steps, beta_1, K, order=2, generator=None, device=None):
    """Discrete data (§6), the probability-flow ODE solver in u = y / t (see above): a step is u' = u + beta(1)
    (K e_hat - 1) (t' - t), theta = softmax(t u); order 2 extrapolates e_hat linearly in t (Adams-Bashforth). probs_fn
    as in discrete_sample."""
    t = [i / n_steps for i in range(n_steps + 1)]
    u = math.sqrt(beta_1 * K) * torch.randn((*shape, K), generator=generator, device=device)
    ones = torch.ones(shape[0], device=device)
    previous = None  # (the last e_hat, its t)
    for i in range(n_steps):
        t_eval = t[i]
        if i == 0:  # the first call in the middle of the first step, on the state of t = 0
            t_eval = t[1] / 2
        e_hat = _full_precision(probs_fn(torch.softmax(t_eval * u, -1), t_eval * ones))
        d = e_hat
        if order == 2 and previous is not None:
            d = e_hat + (e_hat - previous[0]) * (t[i + 1] - t_eval) / (2 * (t_eval - previous[1]))
        previous = (e_hat, t_eval)
        u = u + beta_1 * (K * d - 1) * (t[i + 1] - t[i])
    return sample_categorical(_full_precision(probs_fn(torch.softmax(u, -1), ones)), generator)


# ----------------------------------------------------------------------------------------------------------------------
# Second-order SDE solvers (the SDE-BFN-Solver++2 of Xue et al., ICML 2024, arXiv:2404.15766).
#
# Continuous and discretised data. Write mu_t = a x + b z with a = gamma, b = sqrt(gamma (1 - gamma)) and
# lambda = ln(a / b) = ln s. One step of Algorithm 3 from t to t' (y ~ N(x_hat, 1 / alpha), then the Bayesian update)
# is exactly mu' = (b' / b) e^(-h) mu + a' (1 - e^(-2h)) x_hat + b' sqrt(1 - e^(-2h)) eps with h = lambda' - lambda:
# (b' / b) e^(-h) = rho / rho' = (1 - gamma') / (1 - gamma), a' (1 - e^(-2h)) = alpha / rho' = (gamma' - gamma) /
# (1 - gamma), and the noise variances agree. That is the first-order solver of the reverse SDE with x_hat held fixed
# over the step (SDE-DPM-Solver++1, Lu et al. 2022, arXiv:2211.01095). Order 2 adds the change of x_hat over the last
# step, 0.5 a' (1 - e^(-2h)) (x_hat - x_hat_prev) / r with r = h_prev / h (their 2M, midpoint form). From t = 0
# (mu = 0, lambda = -inf) the first step is the flow itself, mu = a' x_hat + b' eps, and the second is first order.
#
# Discrete data. One step of Algorithm 9 adds alpha (K e_k - 1) + sqrt(alpha K) eps to the logits of theta, with
# alpha = beta(t') - beta(t) and k drawn from p_O; the SDE solver uses the mean e_hat = p_O instead of a draw, and for
# order 2 integrates e_hat linear in t, e_hat + (tau - t) D with D = (e_hat - e_hat_prev) / (t - t_prev), against
# d beta = 2 beta(1) tau d tau: the added term is K beta(1) D (t' - t)^2 (2 t' + t) / 3.
#
# n_steps + 1 network calls at t = 0, 1/n, ..., (n - 1)/n and 1, as the paper's samplers.


def sde_coefficients(i, n_steps, sigma_1):
    """Step i of the SDE solver for mu, from t = i / n to t' = (i + 1) / n: (decay, gain, scale), the three
    coefficients of mu' = decay mu + gain d + scale eps, with d the prediction (sde_prediction) and eps ~ N(0, I)."""
    beta = _beta(i / n_steps, sigma_1)
    beta_next = _beta((i + 1) / n_steps, sigma_1)
    a_next = beta_next / (1 + beta_next)  # gamma(t')
    b_next = math.sqrt(beta_next) / (1 + beta_next)  # sqrt(gamma (1 - gamma)) at t'
    if i == 0:  # from mu = 0 at lambda = -inf: the flow with the prediction as the data
        return 0.0, a_next, b_next
    h = 0.5 * math.log(beta_next / beta)  # lambda' - lambda
    kept = -math.expm1(-2 * h)  # 1 - e^(-2h)
    b = math.sqrt(beta) / (1 + beta)
    return b_next / b * math.exp(-h), a_next * kept, b_next * math.sqrt(kept)


def sde_prediction(pred, previous, i, n_steps, sigma_1):
    """d of step i of the SDE solver: the prediction pred (B, ...), plus for order 2 its change since the last step,
    0.5 (pred - pred_prev) h / (lambda - lambda_prev); previous: (the last step's prediction, its index i), or None."""
    if previous is None:
        return pred
    lam = 0.5 * math.log(_beta(i / n_steps, sigma_1))
    h = 0.5 * math.log(_beta((i + 1) / n_steps, sigma_1)) - lam
    lam_previous = 0.5 * math.log(_beta(previous[1] / n_steps, sigma_1))
    return pred + 0.5 * (pred - previous[0]) * h / (lam - lam_previous)


def discrete_sde_drift(e_hat, previous, alpha, t, t_next, beta_1):
    """The mean change of the logits over step t -> t': alpha (K e_hat - 1), plus for order 2 the change of e_hat,
    K beta(1) D (t' - t)^2 (2 t' + t) / 3; previous: (the last e_hat, its t), or None."""
    K = e_hat.shape[-1]
    drift = alpha * (K * e_hat - 1)
    if previous is None:
        return drift
    slope = (e_hat - previous[0]) / (t - previous[1])
    return drift + K * beta_1 * slope * (t_next - t) ** 2 * (2 * t_next + t) / 3


@torch.no_grad()
def continuous_sample_sde(x_hat_fn, shape, n_steps, sigma_1, generator=None, device=None):
    """Continuous data (§4), the second-order SDE solver (Algorithm 3 plus the change of x_hat). x_hat_fn as in
    continuous_sample; returns x_hat(mu, 1)."""
    mu = torch.zeros(shape, device=device)
    ones = torch.ones(shape[0], device=device)
    previous = None
    for i in range(n_steps):
        x_hat = _full_precision(x_hat_fn(mu, i / n_steps * ones))
        decay, gain, scale = sde_coefficients(i, n_steps, sigma_1)
        d = sde_prediction(x_hat, previous, i, n_steps, sigma_1)
        mu = decay * mu + gain * d + scale * torch.randn(shape, generator=generator, device=device)
        if i > 0:  # the second step is first order
            previous = (x_hat, i)
    return x_hat_fn(mu, ones)


@torch.no_grad()
def discretised_sample_sde(probs_fn, shape, n_steps, sigma_1, K, generator=None, device=None):
    """Discretised data (§5), the second-order SDE solver with the mean bin k_hat as the prediction; returns the centre
    of a bin drawn from p_O(. | theta, 1). probs_fn as in discretised_sample."""
    mu = torch.zeros(shape, device=device)
    ones = torch.ones(shape[0], device=device)
    centres = bin_centres(K, device=device)
    previous = None
    for i in range(n_steps):
        k_hat = (_full_precision(probs_fn(mu, i / n_steps * ones)) * centres).sum(-1)
        decay, gain, scale = sde_coefficients(i, n_steps, sigma_1)
        d = sde_prediction(k_hat, previous, i, n_steps, sigma_1)
        mu = decay * mu + gain * d + scale * torch.randn(shape, generator=generator, device=device)
        if i > 0:
            previous = (k_hat, i)
    return centres[sample_categorical(_full_precision(probs_fn(mu, ones)), generator)]


@torch.no_grad()
def discrete_sample_sde(probs_fn, shape, n_steps, beta_1, K, generator=None, device=None):
    """Discrete data (§6), the second-order SDE solver: Algorithm 9 with the mean e_hat = p_O in place of a drawn
    class, integrated linear in t over each step. probs_fn as in discrete_sample."""
    theta = torch.full((*shape, K), 1 / K, device=device)
    ones = torch.ones(shape[0], device=device)
    previous = None  # (the last e_hat, its t)
    for i in range(n_steps):
        t = i / n_steps
        t_next = (i + 1) / n_steps
        e_hat = _full_precision(probs_fn(theta, t * ones))
        alpha = beta_1 * (2 * i + 1) / n_steps**2  # beta(t') - beta(t)
        drift = discrete_sde_drift(e_hat, previous, alpha, t, t_next, beta_1)
        noise = math.sqrt(alpha * K) * torch.randn(theta.shape, generator=generator, device=device)
        theta = discrete_update(theta, drift + noise)
        previous = (e_hat, t)
    return sample_categorical(_full_precision(probs_fn(theta, ones)), generator)
