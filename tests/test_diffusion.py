"""diffusion.py against closed forms: the DDPM process and its posterior, respacing, the
variational bound, interpolant transport, and every sampler fed the exact model of Gaussian data;
guidance and per-sample noise as invariants."""
import math

import numpy as np
import pytest
import torch

import diffusion
import models

# Gaussian data for the sampler tests: x0 ~ N(MU, SD^2) per dimension, 2 dimensions
MU = torch.tensor([0.5, -1.0])
SD = torch.tensor([0.5, 0.8])


def gaussian_noise(N, seed=0, dims=2):
    """The samplers' noise callable: noise(None) is the starting point (N, dims), noise(shape) a fresh draw."""
    g = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(N, *((dims,) if shape is None else shape), generator=g)


def constant_noise(value):
    """A single-sample start at x_T = value in every dimension (deterministic samplers only)."""
    return lambda shape: torch.full((1, 2), value)


def exact_moments(run):
    """Mean and variance of a deterministic sampler's output for x_T ~ N(0, I), without sampling
    error: with an affine model the output is A x_T + B, so runs from x_T = 0 and 1 give B and A."""
    b = run(constant_noise(0.0))[0].double()
    ab = run(constant_noise(1.0))[0].double()
    return b, (ab - b) ** 2


def assert_gaussian(x, mean, var, mean_slack=0.0, var_slack=0.0):
    """Sample mean and variance of x (N, 2) within 4 standard errors (+ a stated slack for
    discretisation) of `mean` and `var` (relative for the variance)."""
    N = x.shape[0]
    x = x.double()
    mean, var = mean.double(), var.double()
    assert ((x.mean(0) - mean).abs() <= 4 * (var / N).sqrt() + mean_slack).all(), (x.mean(0), mean)
    assert ((x.var(0) / var - 1).abs() <= 4 * math.sqrt(2 / N) + var_slack).all(), (x.var(0), var)


# ============================================================================= 1. Gaussian diffusion


def test_linear_schedule_and_alphas_cumprod_by_hand():
    """DDPM's betas are 1e-4 + i (0.02 - 1e-4) / 999 and alphas_cumprod their running product of
    1 - beta, computed here with plain Python floats."""
    d = diffusion.GaussianDiffusion(diffusion.linear_betas())
    assert d.num_timesteps == 1000 and d.betas[0] == 1e-4 and d.betas[-1] == 0.02
    prod = 1.0
    for i in range(1000):
        beta = 1e-4 + i * (0.02 - 1e-4) / 999
        prod *= 1 - beta
        assert abs(d.betas[i] - beta) < 1e-15
        assert abs(d.alphas_cumprod[i] - prod) < 1e-12 * max(prod, 1e-3)
    # IDDPM's rescaling for other lengths: 250 steps span 4e-4 to 0.08
    assert np.allclose(diffusion.linear_betas(250)[[0, -1]], [4e-4, 0.08], rtol=1e-12)


@pytest.mark.parametrize("t", [0, 50, 500, 999])
def test_q_sample_moments(t):
    """x_t given a fixed x0 has mean sqrt(abar_t) x0 and variance 1 - abar_t: checked on 20000
    noise draws within 4 standard errors."""
    d = diffusion.GaussianDiffusion(diffusion.linear_betas())
    N = 20000
    x0 = torch.tensor([1.0, -0.5, 2.0, 0.0]).expand(N, 4)
    noise = torch.randn(N, 4, generator=torch.Generator().manual_seed(t))
    xt = d.q_sample(x0, torch.full((N,), t), noise).double()
    abar = float(np.prod(1 - diffusion.linear_betas()[: t + 1]))
    mean, var = math.sqrt(abar) * x0[0].double(), 1 - abar
    assert ((xt.mean(0) - mean).abs() <= 4 * math.sqrt(var / N)).all()
    assert ((xt.var(0) / var - 1).abs() <= 4 * math.sqrt(2 / N)).all()


@pytest.mark.parametrize("steps", [1000, 50])
def test_posterior_equals_gaussian_conditioning(steps):
    """q(x_{t-1} | x_t, x0) from the joint of x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and
    x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) e: mean mu1 + cov / var2 (x_t - mu2), variance
    var1 - cov^2 / var2; in float64, on the full and a respaced process."""
    d = diffusion.GaussianDiffusion(diffusion.linear_betas()).respaced(steps)
    abar = np.cumprod(1 - d.betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    alpha = 1 - d.betas
    var1, var2 = 1 - abar_prev, 1 - abar
    cov = np.sqrt(alpha) * var1
    k = cov / var2  # regression of x_{t-1} on x_t
    np.testing.assert_allclose(d.posterior_mean_coef2, k, rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1, np.sqrt(abar_prev) - k * np.sqrt(abar), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(d.posterior_variance, var1 - cov**2 / var2, rtol=1e-8, atol=1e-18)
    # the variance is 0 at t = 0, whose log is clipped to the next step's
    assert d.posterior_variance[0] == 0
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log(np.r_[d.posterior_variance[1], d.posterior_variance[1:]]))
    # the torch path (float32) gives the same numbers
    t = torch.tensor([0, 1, steps // 2, steps - 1])
    x0, xt = torch.randn(4, 3), torch.randn(4, 3)
    mean, log_var = d.q_posterior(x0, xt, t)
    c1, c2 = torch.from_numpy(np.sqrt(abar_prev) - k * np.sqrt(abar))[t], torch.from_numpy(k)[t]
    torch.testing.assert_close(mean.double(), c1[:, None] * x0.double() + c2[:, None] * xt.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_var.double().flatten(), torch.from_numpy(d.posterior_log_variance_clipped)[t], rtol=1e-6, atol=0)


def dit_spacing(num_timesteps, count):
    """IDDPM's space_timesteps(num_timesteps, str(count)) as DiT calls it: a float cursor advanced by
    (num_timesteps - 1) / (count - 1), rounded at each step."""
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@pytest.mark.parametrize("count", [250, 50, 1, 1000])
def test_respacing_keeps_dit_steps_and_alphas_cumprod(count):
    """The kept steps are DiT's (round(i * 999 / (count - 1)), 0 and 999 included), the respaced
    betas reproduce alphas_cumprod at those steps, and 1000 of 1000 is the identity."""
    base = diffusion.GaussianDiffusion(diffusion.linear_betas())
    keep = diffusion.space_timesteps(1000, count)
    assert keep == dit_spacing(1000, count) and len(keep) == count
    if count > 1:
        assert keep == [round(i * 999 / (count - 1)) for i in range(count)]
        assert keep[0] == 0 and keep[-1] == 999
    else:
        assert keep == [0]
    sp = base.respaced(count)
    assert sp.num_timesteps == count and sp.timestep_map == keep
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-12)
    assert sp.network_time(torch.arange(count)).tolist() == keep
    if count == 1000:
        np.testing.assert_allclose(sp.betas, base.betas, rtol=1e-12)
    # the guidance interval reads the original step in [0, 1], for any original length
    assert sp.guidance_time(count - 1) == (1.0 if count > 1 else 0.0) and sp.guidance_time(0) == 0.0
    short = diffusion.GaussianDiffusion(diffusion.linear_betas(200)).respaced(5)
    assert [short.guidance_time(i) for i in range(5)] == [k / 199 for k in short.timestep_map] and short.timestep_map[-1] == 199


def test_space_timesteps_rejects_impossible_counts():
    """More steps than the process has, or none, is an error rather than a silent clamp."""
    with pytest.raises(ValueError, match="1001"):
        diffusion.space_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        diffusion.space_timesteps(1000, 0)


def test_vb_of_the_true_posterior():
    """A network output whose mean is the true posterior mean (eps = the true noise) has KL 0 with
    v = -1 (variance beta~_t) and KL 0.5 (log(beta/beta~) + beta~/beta - 1) / ln 2 bits with
    v = +1 (variance beta_t), for t >= 1; at t = 0 the term is the decoder NLL, positive."""
    d = diffusion.GaussianDiffusion(diffusion.linear_betas(), learn_sigma=True)
    torch.manual_seed(0)
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    x0 = 0.5 * torch.randn(6, 4, 2, 2)
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    kl_min = d.vb_terms(torch.cat([noise, -torch.ones_like(x0)], 1), x0, xt, t)
    torch.testing.assert_close(kl_min, torch.zeros(6), rtol=0, atol=1e-6)
    beta, beta_tilde = d.betas[t.numpy()], d.posterior_variance[t.numpy()]
    expected = 0.5 * (np.log(beta / beta_tilde) + beta_tilde / beta - 1) / math.log(2)
    kl_max = d.vb_terms(torch.cat([noise, torch.ones_like(x0)], 1), x0, xt, t)
    torch.testing.assert_close(kl_max.double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-6)
    assert (kl_max[:4] > 1e-4).all()  # not trivially 0 (beta~ -> beta at large t)
    t0 = torch.zeros(6, dtype=torch.long)
    nll = d.vb_terms(torch.cat([noise, -torch.ones_like(x0)], 1), x0, d.q_sample(x0, t0, noise), t0)
    assert (nll > 0).all()


def test_training_losses_hybrid_gradients_and_network_time():
    """IDDPM's hybrid loss: the vb term's gradient reaches only the variance channels (the mean is
    detached), the MSE only the epsilon channels; the MSE equals the hand value; a respaced process
    feeds the network the original step indices."""
    C = 2
    torch.manual_seed(0)
    w_eps = torch.randn(C, C, requires_grad=True)
    w_v = (0.3 * torch.randn(C, C)).requires_grad_()
    seen = []

    def model(x, t, y):  # a linear stand-in: eps = w_eps x, v = tanh(w_v x)
        seen.append(t.clone())
        return torch.cat([torch.einsum("oc,nchw->nohw", w_eps, x), torch.tanh(torch.einsum("oc,nchw->nohw", w_v, x))], 1)

    d = diffusion.GaussianDiffusion(diffusion.linear_betas(), learn_sigma=True)
    x0, noise = torch.randn(3, C, 2, 2), torch.randn(3, C, 2, 2)
    t = torch.tensor([5, 300, 999])
    terms = d.training_losses(model, x0, None, t=t, noise=noise)
    abar = torch.from_numpy(d.alphas_cumprod[t.numpy()]).float().view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    mse = ((noise - torch.einsum("oc,nchw->nohw", w_eps, xt)) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(terms["mse"], mse)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert seen[0].tolist() == [5, 300, 999]
    terms["vb"].sum().backward(retain_graph=True)
    assert w_eps.grad is None or not w_eps.grad.any()
    assert w_v.grad is not None and w_v.grad.abs().sum() > 0
    w_v.grad = None
    terms["mse"].sum().backward()
    assert w_eps.grad.abs().sum() > 0 and (w_v.grad is None or not w_v.grad.any())
    # respaced: step 1 of 250 is the network's step round(999 / 249) = 4
    d.respaced(250).training_losses(model, x0, None, t=torch.tensor([0, 1, 249]), noise=noise)
    assert seen[-1].tolist() == [0, 4, 999]


def exact_eps(base, keep=None):
    """The optimal epsilon for x0 ~ N(MU, SD^2): E[e | x_t] = sqrt(1 - abar)(x_t - sqrt(abar) MU) /
    (abar SD^2 + 1 - abar), abar of the original step t_net. With `keep` (the respaced steps) also
    the v channels that give the true reverse variance Var(x_prev | x_t) = Vp (1 - alpha Vp / Vt),
    Vp, Vt the marginal variances, alpha = abar_t / abar_prev: the reverse step is then exact."""
    abar_all = torch.from_numpy(base.alphas_cumprod)

    def fn(x, t_net, t):
        abar = abar_all[t_net].view(-1, 1)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * SD**2 + 1 - abar)
        if keep is None:
            return eps.float()
        i = keep.index(int(t_net[0]))
        if i == 0:  # the last step adds no noise: its variance is unused
            return torch.cat([eps, -torch.ones_like(eps)], 1).float()
        abar_prev = abar_all[keep[i - 1]]
        alpha = abar / abar_prev
        vp, vt = abar_prev * SD**2 + 1 - abar_prev, abar * SD**2 + 1 - abar
        true_var = vp * (1 - alpha * vp / vt)
        beta = 1 - alpha
        beta_tilde = beta * (1 - abar_prev) / (1 - abar)
        frac = (true_var.log() - beta_tilde.log()) / (beta.log() - beta_tilde.log())
        return torch.cat([eps, (2 * frac - 1).expand_as(eps)], 1).float()
    return fn


@pytest.mark.parametrize("sampler,learn_sigma,steps,var_slack", [
    ("ddpm", True, 100, 0.0),    # the true reverse variance: exact but for the N(0, I) start
    ("ddpm", False, 250, 0.02),  # fixed "large" variance beta_t: first-order bias (~1% at 250)
    ("ddim", False, 250, 0.03),  # DDIM: first order (~2.3% at 250, see the convergence test)
])
def test_ddpm_samplers_reproduce_gaussian_data(sampler, learn_sigma, steps, var_slack):
    """sample_ddpm fed the exact epsilon of N(MU, SD^2) data over a respaced process returns
    samples with mean MU and variance SD^2 within sampling error (+ the stated discretisation slack;
    the 0.01 mean slack covers starting from N(0, I) instead of N(sqrt(abar_999) MU, ...))."""
    base = diffusion.GaussianDiffusion(diffusion.linear_betas(), learn_sigma=learn_sigma)
    sp = base.respaced(steps)
    fn = exact_eps(base, sp.timestep_map if learn_sigma else None)
    x = diffusion.sample_ddpm(sp, fn, gaussian_noise(50000 if sampler == "ddpm" else 20000), ddim=sampler == "ddim")
    assert_gaussian(x, MU, SD**2, mean_slack=0.01, var_slack=var_slack)


def test_ddim_converges_at_first_order():
    """DDIM with the exact epsilon, moments computed without sampling error: the variance error
    shrinks about 10x from 100 to 1000 steps (first order) and is under 1% at 1000."""
    base = diffusion.GaussianDiffusion(diffusion.linear_betas(), learn_sigma=False)
    fn = exact_eps(base)
    err = {}
    for steps in (100, 1000):
        mean, var = exact_moments(lambda noise: diffusion.sample_ddpm(base.respaced(steps), fn, noise, ddim=True))
        err[steps] = (var / SD.double() ** 2 - 1).abs()
        assert ((mean - MU).abs() < 0.01).all()
    assert (err[1000] < 0.01).all()
    assert ((err[100] / err[1000] > 6) & (err[100] / err[1000] < 14)).all()


# ============================================================================= 2. interpolant transport


def path_coefficients(path, t):
    """a, s, a', s' of x_t = a x + s e in our time (t = 0 data), written out per path."""
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def gaussian_posterior(x, a, s):
    """E[x0 | x_t] and E[e | x_t] for x0 ~ N(MU, SD^2), x_t = a x0 + s e: with V = a^2 SD^2 + s^2,
    MU + a SD^2 (x_t - a MU) / V and s (x_t - a MU) / V."""
    V = a**2 * SD**2 + s**2
    return MU + a * SD**2 * (x - a * MU) / V, s * (x - a * MU) / V


def exact_velocity(path):
    """The optimal network in our convention ("repa" time input): fed t, returns E[a' x0 + s' e | x_t]."""
    def fn(x, t_net, t):
        a, s, da, ds = (c.view(-1, 1) for c in path_coefficients(path, t_net))
        ex, ee = gaussian_posterior(x, a, s)
        return da * ex + ds * ee
    return fn


def exact_sit_velocity(path):
    """The optimal network in SiT's convention: fed tau = 1 - t (tau = 1 at the data), its paths
    x_tau = alpha x0 + sigma e (linear: alpha = tau, sigma = 1 - tau; GVP: alpha = sin(pi tau / 2),
    sigma = cos(pi tau / 2)), returning E[alpha' x0 + sigma' e | x_tau] (data minus noise, linear)."""
    def fn(x, t_net, t):
        tau = t_net.view(-1, 1)
        if path == "linear":
            alpha, sigma, dalpha, dsigma = tau, 1 - tau, torch.ones_like(tau), -torch.ones_like(tau)
        else:
            h = math.pi / 2
            alpha, sigma, dalpha, dsigma = torch.sin(h * tau), torch.cos(h * tau), h * torch.cos(h * tau), -h * torch.sin(h * tau)
        ex, ee = gaussian_posterior(x, alpha, sigma)
        return dalpha * ex + dsigma * ee
    return fn


def sde_target(path, time_input, t_last=0.04):
    """Mean and variance after the SDE sampler, exactly in the limit of small steps: the marginal at
    t_last is N(a MU, V) and the noise-free last step x + (v - w score)(-t_last) is affine in x,
    with slope 1 - t_last (v' + w / V), v' = (a' a SD^2 + s' s) / V (the score's slope is -1 / V);
    w = s (SiT) or t (REPA)."""
    a, s, da, ds = path_coefficients(path, torch.tensor(t_last))
    V = a**2 * SD**2 + s**2
    w = s if time_input == "sit" else t_last
    slope = 1 - t_last * ((da * a * SD**2 + ds * s) / V + w / V)
    return (a - t_last * da) * MU, slope**2 * V


@pytest.mark.parametrize("path,sampler,time_input", [
    ("linear", "euler", "repa"), ("linear", "heun", "repa"), ("linear", "sde", "repa"),
    ("gvp", "euler", "repa"), ("gvp", "heun", "repa"), ("gvp", "sde", "repa"),
    ("linear", "heun", "sit"), ("gvp", "sde", "sit"),
])
def test_transport_samplers_reproduce_gaussian_data(path, sampler, time_input):
    """The ODE (Euler, Heun) and SDE samplers fed the exact velocity of N(MU, SD^2) data return
    samples with mean MU and variance SD^2 within sampling error; the SDE's noise-free last step
    from t = 0.04 lands on its closed form (sde_target). Slack: Euler's first-order bias (~1.2% at
    250 steps), Euler-Maruyama's (measured within 0.5% on 200k samples). A "sit" network is fed
    1 - t and returns SiT's velocity: the conversion must undo both."""
    transport = diffusion.Transport(path, "velocity", time_input)
    fn = exact_velocity(path) if time_input == "repa" else exact_sit_velocity(path)
    noise = gaussian_noise(20000, seed=1)
    if sampler == "sde":
        x = diffusion.sample_sde(transport, fn, noise, 250)
        mean, var = sde_target(path, time_input)
        assert_gaussian(x, mean, var, mean_slack=0.01, var_slack=0.01)
    else:
        x = diffusion.sample_ode(transport, fn, noise, 250, heun=sampler == "heun")
        assert_gaussian(x, MU, SD**2, mean_slack=0.01, var_slack=0.015 if sampler == "euler" else 0.0)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_ode_samplers_converge_at_their_order(path):
    """Exact moments of the ODE samplers (no sampling error): Euler's variance error shrinks ~4x
    from 100 to 400 steps, Heun's ~16x, and Heun at 100 steps is within 1e-3 of SD^2."""
    transport = diffusion.Transport(path, "velocity", "repa")
    fn = exact_velocity(path)
    err = {}
    for heun in (False, True):
        for steps in (100, 400):
            mean, var = exact_moments(lambda noise: diffusion.sample_ode(transport, fn, noise, steps, heun=heun))
            err[heun, steps] = (var / SD.double() ** 2 - 1).abs()
            assert ((mean - MU).abs() < 0.01).all()
    euler_ratio, heun_ratio = err[False, 100] / err[False, 400], err[True, 100] / err[True, 400]
    assert ((euler_ratio > 3) & (euler_ratio < 5)).all(), euler_ratio
    assert ((heun_ratio > 10) & (heun_ratio < 22)).all(), heun_ratio
    assert (err[True, 100] < 1e-3).all()


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_velocity_from_noise_and_score_and_back(path):
    """For x_t = a x0 + s e: a noise prediction e and a score prediction -e / s both convert to the
    velocity a' x0 + s' e, Transport.score of that velocity is -e / s (float64), and the SDE's
    diffusion coefficient is s(t)."""
    torch.manual_seed(0)
    x0, e = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    a, s, da, ds = (c.view(-1, 1) for c in path_coefficients(path, t))
    xt, v = a * x0 + s * e, da * x0 + ds * e
    torch.testing.assert_close(diffusion.Transport(path, "noise").velocity(e, xt, t), v)
    torch.testing.assert_close(diffusion.Transport(path, "score").velocity(-e / s, xt, t), v)
    torch.testing.assert_close(diffusion.Transport(path).score(v, xt, t), -e / s)
    torch.testing.assert_close(diffusion.Transport(path).velocity(v, xt, t), v)
    # the SDE's w(t) (any w keeps the marginals): SiT's "sigma" form s(t); t for REPA's networks, as
    # REPA's sampler on every path
    torch.testing.assert_close(diffusion.Transport(path).diffusion_coefficient(t), s.flatten())
    torch.testing.assert_close(diffusion.Transport(path, time_input="repa").diffusion_coefficient(t), t)


@pytest.mark.parametrize("path", ["linear", "gvp"])
@pytest.mark.parametrize("prediction,time_input", [("velocity", "repa"), ("velocity", "sit"), ("noise", "sit"), ("score", "repa")])
def test_transport_training_loss_is_zero_for_the_true_target(path, prediction, time_input):
    """A network returning the true target for the (x0, noise, t) given has loss 0: our velocity
    when fed t, SiT's velocity alpha' x0 + sigma' e when fed 1 - t, the noise, or the score -e / s;
    the wrong convention (our velocity fed to a "sit" transport, or the negated target) does not."""
    torch.manual_seed(0)
    x0, e = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.1, 0.4, 0.6, 0.9])
    transport = diffusion.Transport(path, prediction, time_input)

    def target(t_in):
        if prediction == "noise":
            return e
        if time_input == "sit":  # SiT's velocity in tau = 1 - t is minus ours
            a, s, da, ds = (c.view(-1, 1) for c in path_coefficients(path, 1 - t_in))
            return -(da * x0 + ds * e)
        a, s, da, ds = (c.view(-1, 1) for c in path_coefficients(path, t_in))
        return da * x0 + ds * e if prediction == "velocity" else -e / s

    loss = transport.training_losses(lambda xt, t_in, y: target(t_in), x0, None, t=t, noise=e)["loss"]
    torch.testing.assert_close(loss, torch.zeros(4), rtol=0, atol=1e-10)
    wrong = transport.training_losses(lambda xt, t_in, y: -target(t_in), x0, None, t=t, noise=e)["loss"]
    assert (wrong > 0.1).all()
    if time_input == "sit" and prediction == "velocity":
        def ours(xt, t_in, y):  # our velocity at the time the network is fed, without SiT's sign
            a, s, da, ds = (c.view(-1, 1) for c in path_coefficients(path, t_in))
            return da * x0 + ds * e
        assert (transport.training_losses(ours, x0, None, t=t, noise=e)["loss"] > 0.1).all()


def test_transport_rejects_unknown_names():
    """A typo in path, prediction or time_input fails at construction."""
    for args in [("cosine",), ("linear", "x0"), ("linear", "velocity", "edm")]:
        with pytest.raises(ValueError):
            diffusion.Transport(*args)


# ============================================================================= 3. guidance


def tiny_dit(family="dit", seed=0, **kwargs):
    """DiT-T/2 on 8x8 latents with random weights everywhere (the init zeroes adaLN and the output
    layer, so its outputs would be 0), in eval mode."""
    torch.manual_seed(seed)
    model = models.build_generator(f"{'DiT' if family == 'dit' else 'SiT'}-T/2", input_size=8, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def test_heun_decides_guidance_at_the_start_of_each_step():
    """REPA's Heun sampler decides whether to guide both of a step's calls at the step's start
    time t_cur; the network itself sees t_cur, then t_next."""
    calls = []

    def fn(x, t_net, t_guide):
        calls.append((round(t_net[0].item(), 6), t_guide))
        return torch.zeros_like(x)

    transport = diffusion.Transport("linear", "velocity", "repa")
    diffusion.sample_ode(transport, fn, lambda shape: torch.zeros(2, 1), 4, heun=True)
    ts = torch.linspace(1 - transport.eps, transport.eps, 5, dtype=torch.float64).tolist()
    expected = []
    for i in range(4):
        expected.append((round(ts[i], 6), ts[i]))
        if i < 3:
            expected.append((round(ts[i + 1], 6), ts[i]))
    assert calls == expected


def test_guided_model_applies_cfg_only_inside_the_interval(monkeypatch):
    """Inside [guidance_low, guidance_high] (ends included) one doubled batch gives uncond + s (cond
    - uncond) on the latent channels and the conditional variance; outside, one plain conditional
    call; cfg_scale 1 never doubles the batch."""
    model = tiny_dit(num_classes=10)
    x, t_net, y = torch.randn(2, 4, 8, 8), torch.tensor([300, 300]), torch.tensor([1, 7])
    with torch.no_grad():
        cond, uncond = model(x, t_net, y), model(x, t_net, torch.full_like(y, 10))
    guided = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    assert (guided - cond[:, :4]).abs().max() > 1e-2  # guidance changes something
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, t, y: calls.append(len(x)) or forward(x, t, y))
    fn = diffusion.guided_model(model, y, 10, cfg_scale=3.0, guidance_low=0.2, guidance_high=0.7)
    with torch.no_grad():
        for t in (0.2, 0.5, 0.7):
            calls.clear()
            out = fn(x, t_net, t)
            assert calls == [4] and out.shape == (2, 8, 8, 8)
            torch.testing.assert_close(out[:, :4], guided, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[:, 4:], cond[:, 4:], rtol=1e-4, atol=1e-5)
        for t in (0.1, 0.9):
            calls.clear()
            assert torch.equal(fn(x, t_net, t), cond) and calls == [2]
        calls.clear()
        plain = diffusion.guided_model(model, y, 10, cfg_scale=1.0)
        assert torch.equal(plain(x, t_net, 0.5), cond) and calls == [2]


# ============================================================================= 4. per-sample noise


def test_sample_noise_depends_only_on_seed_and_index():
    """Sample i's label and noise (drawn in the same order) are the same in any batch, and change
    with the seed and between indices."""
    def draw(seed, indices):
        sn = diffusion.SampleNoise(seed, indices, "cpu")
        return sn.labels(1000), sn((4, 2, 2)), sn((4, 2, 2))

    full = draw(3, [0, 1, 2, 3])
    for i in (0, 2, 3):
        alone = draw(3, [i])
        for a, b in zip(full, alone):
            assert torch.equal(a[i : i + 1], b)
    pair = draw(3, [3, 1])
    assert all(torch.equal(a[[3, 1]], b) for a, b in zip(full, pair))
    other = draw(4, [2])
    assert not torch.equal(other[1], full[1][2:3])
    assert not torch.equal(full[1][0], full[1][1])
    assert not torch.equal(full[1][2], full[2][2])  # a second draw is fresh noise


# ============================================================================= 5. generation


@pytest.mark.parametrize("family,sampler", [("dit", "ddpm"), ("dit", "ddim"), ("sit", "sde"), ("sit", "heun")])
def test_generate_is_independent_of_the_batch(family, sampler):
    """generate() with the released recipe's objective: sample 1 is the same whether it is drawn
    alone or with samples 0 and 2 (per-sample noise; no cross-sample coupling), with guidance."""
    model = tiny_dit(family, num_classes=10)
    recipe = models.released_recipe(f"{'DiT' if family == 'dit' else 'SiT'}-T/2", 64)
    objective = diffusion.make_objective(recipe["objective"], model)
    y = torch.tensor([3, 5, 7])
    with torch.no_grad():
        batch = diffusion.generate(model, objective, diffusion.SampleNoise(0, [0, 1, 2], "cpu"), y, sampler, 4, cfg_scale=2.0)
        alone = diffusion.generate(model, objective, diffusion.SampleNoise(0, [1], "cpu"), y[1:2], sampler, 4, cfg_scale=2.0)
    assert batch.shape == (3, 4, 8, 8) and torch.isfinite(batch).all()
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-4)
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_make_objective_and_sampler_mismatch():
    """DDPM's variance is learned only for a DiT-family network with learn_sigma (SiT drops the
    channels); a diffusion objective refuses the transport samplers and vice versa, naming them."""
    dit, sit = tiny_dit("dit"), tiny_dit("sit")
    ddpm = dict(kind="diffusion", num_timesteps=1000)
    assert diffusion.make_objective(ddpm, dit).learn_sigma is True
    assert diffusion.make_objective(ddpm, sit).learn_sigma is False
    transport = diffusion.make_objective(models.released_recipe("SiT-T/2", 64)["objective"], sit)
    assert (transport.path, transport.prediction, transport.time_input) == ("linear", "velocity", "sit")
    noise = diffusion.SampleNoise(0, [0], "cpu")
    with pytest.raises(ValueError, match="ddpm or ddim"):
        diffusion.generate(dit, diffusion.make_objective(ddpm, dit), noise, torch.tensor([1]), "sde", 2)
    with pytest.raises(ValueError, match="euler, heun or sde"):
        diffusion.generate(sit, transport, noise, torch.tensor([1]), "ddpm", 2)
