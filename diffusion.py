"""The math shared by train_dit.py and sample.py: Gaussian diffusion (DiT), interpolant transport
(SiT, REPA), classifier-free guidance and the samplers.

Time convention, everywhere in this file: t runs from data (t = 0) to noise (t = 1), and sampling
runs t downwards. DDPM's integer steps (0 = data, 999 = noise), REPA's transport time and the
guidance interval of Kynkaanniemi et al. 2024 all read this way. SiT's own code puts t = 1 at the
data: a network trained by SiT (recipe `time_input: "sit"`) is called with 1 - t and its velocity
is negated, in `Transport._call` and nowhere else.

Rooms: 1. Gaussian diffusion  2. interpolant transport, REPA's alignment loss  3. guidance  4. per-sample noise
5. samplers (DDPM, DDIM, ODE Euler/Heun, SDE Euler-Maruyama)  6. objectives from a recipe
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

# ============================================================================= 1. Gaussian diffusion


def linear_betas(num_timesteps=1000):
    """DDPM's linear schedule, 1e-4 to 0.02 over 1000 steps (rescaled for other lengths, as IDDPM)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, num_steps):
    """IDDPM's respacing as DiT calls it (`create_diffusion(str(num_steps))`): num_steps indices
    spread evenly over [0, num_timesteps - 1] with rounding, both ends kept."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"cannot take {num_steps} steps out of {num_timesteps}")
    if num_steps == 1:
        return [0]
    stride, position, steps = (num_timesteps - 1) / (num_steps - 1), 0.0, []
    for _ in range(num_steps):  # a running sum as IDDPM (i * stride rounds differently at exact halves)
        steps.append(round(position))
        position += stride
    return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of x under N(means, e^(2 log_scales)) integrated over 8-bit bins of [-1, 1]
    (DDPM's decoder term; DiT applies it to latents unchanged, so we do too)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """DDPM with epsilon prediction, as DiT trains it (Ho et al. 2020; Nichol and Dhariwal 2021).

    With `learn_sigma` the network outputs 2C channels: epsilon and v in [-1, 1], the variance
    being exp(frac * log beta_t + (1 - frac) * log beta~_t), frac = (v + 1) / 2 (IDDPM's learned
    range); without it the variance is fixed to beta_t ("fixed large"). `timestep_map` maps the
    steps of a respaced process to the original indices the network was trained on.
    """

    def __init__(self, betas, learn_sigma=True, timestep_map=None, original_timesteps=None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        self.original_timesteps = original_timesteps or self.num_timesteps  # before any respacing
        self.learn_sigma = learn_sigma
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: its log is clipped to beta~_1, as IDDPM (a one-step process has no beta~_1:
        # its only step returns the mean, so beta_0 stands in)
        first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # fixed-large variance: beta_t, with beta~_1 at t = 0 (IDDPM)
        self.fixed_log_variance = np.log(np.append(first, self.betas[1:]))

    def respaced(self, num_steps):
        """The process restricted to `num_steps` of the original steps (IDDPM's SpacedDiffusion):
        new betas from the kept alphas_cumprod, so those are reproduced exactly."""
        keep = space_timesteps(self.num_timesteps, num_steps)
        betas, last = [], 1.0
        for i in keep:
            betas.append(1.0 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        return GaussianDiffusion(np.array(betas), self.learn_sigma, [self.timestep_map[i] for i in keep],
                                 self.original_timesteps)

    @staticmethod
    def _at(arr, t, x):
        """arr[t] per sample, shaped to broadcast against x, in float32."""
        return torch.from_numpy(arr).to(x.device)[t].float().view(-1, *([1] * (x.ndim - 1)))

    def network_time(self, t):
        """Indices of this (maybe respaced) process -> the original steps the network knows."""
        return torch.tensor(self.timestep_map, device=t.device)[t]

    def guidance_time(self, i):
        """Step i of this process in [0, 1] (1 = noise), where the guidance interval is read."""
        return self.timestep_map[i] / max(1, self.original_timesteps - 1)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return self._at(np.sqrt(self.alphas_cumprod), t, x0) * x0 + self._at(np.sqrt(1.0 - self.alphas_cumprod), t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt)

    def predict_x0(self, xt, t, eps):
        return self._at(np.sqrt(1.0 / self.alphas_cumprod), t, xt) * xt - self._at(np.sqrt(1.0 / self.alphas_cumprod - 1), t, xt) * eps

    def p_mean_variance(self, output, xt, t):
        """Network output (N, C or 2C, ...) at x_t -> mean, log-variance of p(x_{t-1} | x_t) and x0."""
        C = xt.shape[1]
        if self.learn_sigma:
            eps, v = output[:, :C], output[:, C:]
            frac = (v + 1) / 2
            min_log = self._at(self.posterior_log_variance_clipped, t, xt)
            max_log = self._at(np.log(self.betas), t, xt)
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = output[:, :C]
            log_variance = self._at(self.fixed_log_variance, t, xt).expand_as(xt)
        x0 = self.predict_x0(xt, t, eps)
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_variance, x0

    def vb_terms(self, output, x0, xt, t):
        """The variational bound per sample in bits: KL(q(x_{t-1}|x_t,x0) || p) for t > 0, the
        discretised decoder NLL at t = 0."""
        true_mean, true_log_variance = self.q_posterior(x0, xt, t)
        mean, log_variance, _ = self.p_mean_variance(output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, y, t=None, noise=None):
        """DiT's loss per sample: MSE on epsilon, plus (learn_sigma) the variational bound through
        the variance channels only (the mean is detached there: IDDPM's hybrid loss)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        output = model(xt, self.network_time(t), y).float()
        C = x0.shape[1]
        terms = {"mse": mean_flat((noise - output[:, :C]) ** 2)}
        if self.learn_sigma:
            frozen = torch.cat([output[:, :C].detach(), output[:, C:]], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0, xt, t)
        terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
        return terms


# ============================================================================= 2. interpolant transport


class Transport:
    """x_t = a(t) x + s(t) noise with a(0) = 1, s(0) = 0 (data) and a(1) = 0, s(1) = 1 (noise).

    path: linear (a = 1 - t, s = t; SiT's Linear, REPA's linear) or gvp (a = cos(pi t / 2),
    s = sin(pi t / 2); SiT's GVP, REPA's cosine). prediction: what the network outputs, the
    velocity dx_t/dt (SiT's default) or the noise or the score; the samplers always ask for the
    velocity. time_input: "sit" for networks trained with SiT's time (fed 1 - t, velocity negated),
    "repa" for networks fed t as it is here (REPA's convention, and ours for REPA training).
    """

    def __init__(self, path="linear", prediction="velocity", time_input="sit"):
        if path not in ("linear", "gvp") or prediction not in ("velocity", "noise", "score") or time_input not in ("sit", "repa"):
            raise ValueError(f"unknown transport {path}/{prediction}/{time_input}")
        self.path, self.prediction, self.time_input = path, prediction, time_input
        # SiT's epsilons: velocity on these paths is stable on [0, 1]; noise and score avoid the ends
        self.eps = 0.0 if prediction == "velocity" else 1e-3

    def coefficients(self, t):
        """a(t), s(t), a'(t), s'(t) for a tensor t."""
        if self.path == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return torch.cos(half_pi * t), torch.sin(half_pi * t), -half_pi * torch.sin(half_pi * t), half_pi * torch.cos(half_pi * t)

    def _coefficients_like(self, t, x):
        """coefficients(t), shaped to broadcast against x and in x's dtype (t may be float64)."""
        return [c.to(x.dtype).view(-1, *([1] * (x.ndim - 1))) for c in self.coefficients(t)]

    def network_output(self, model, xt, t, y):
        """Call the network in the time it was trained with; returns its prediction in our
        convention (a velocity in our time is minus SiT's). Extra channels (a DiT's learned-sigma
        half) are ignored, as SiT does. The samplers pass t in float64, so 1 - t near the ends is
        the float32 value SiT's own grid would hold."""
        return self._call(model, xt, t, y)[0]

    def _call(self, model, xt, t, y):
        """network_output and, for a network with REPA's projectors, its projected tokens (else None)."""
        out = model(xt, ((1 - t) if self.time_input == "sit" else t).to(xt.dtype), y)
        out, projected = out if isinstance(out, tuple) else (out, None)
        out = out[:, : xt.shape[1]]
        if self.time_input == "sit" and self.prediction == "velocity":
            out = -out
        return out, projected

    def velocity(self, output, xt, t):
        """Network output -> velocity dx_t/dt in our time."""
        if self.prediction == "velocity":
            return output
        a, s, da, ds = self._coefficients_like(t, xt)
        noise = output if self.prediction == "noise" else -s * output  # score = -noise / s
        x0 = (xt - s * noise) / a
        return da * x0 + ds * noise

    def score(self, velocity, xt, t):
        """grad log p_t(x_t) = -E[noise | x_t] / s(t), from the velocity: solving
        [x_t; v] = [[a, s], [a', s']] [x0; noise] gives noise = (a v - a' x_t) / (a s' - s a')."""
        a, s, da, ds = self._coefficients_like(t, xt)
        noise = (a * velocity - da * xt) / (a * ds - s * da)
        return -noise / s

    def diffusion_coefficient(self, t):
        """w(t) of the reverse SDE dx = (v - w score) dt + sqrt(2 w) dW: SiT's "sigma" form w = s(t)
        for SiT's networks; w = t on every path for REPA's, as its sampler (its 2t is our 2w). On
        the linear path the two agree."""
        return t if self.time_input == "repa" else self.coefficients(t)[1]

    def training_losses(self, model, x0, y, t=None, noise=None):
        """SiT's loss per sample: MSE of the prediction (velocity, noise, or score times s, as SiT),
        t uniform in [eps, 1 - eps]. A network with REPA's projectors also hands back its projected
        tokens, as `projected`, for alignment_loss."""
        if t is None:
            t = torch.rand(x0.shape[0], device=x0.device) * (1 - 2 * self.eps) + self.eps
        noise = torch.randn_like(x0) if noise is None else noise
        a, s, da, ds = self._coefficients_like(t, x0)
        xt = a * x0 + s * noise
        output, projected = self._call(model, xt, t, y)
        output = output.float()
        if self.prediction == "velocity":
            loss = mean_flat((output - (da * x0 + ds * noise)) ** 2)
        elif self.prediction == "noise":
            loss = mean_flat((output - noise) ** 2)
        else:
            loss = mean_flat((output * s + noise) ** 2)
        return {"loss": loss} if projected is None else {"loss": loss, "projected": projected}


def alignment_loss(projected, targets):
    """REPA's representation alignment per sample (Yu et al. 2025): minus the cosine
    similarity between each projected token and the encoder's patch token at the same position,
    averaged over tokens and encoders; -1 when every pair points the same way, whatever the scale."""
    per_encoder = [-(F.normalize(z_hat.float(), dim=-1) * F.normalize(z.float(), dim=-1)).sum(-1).mean(-1)  # (N,)
                   for z_hat, z in zip(projected, targets, strict=True)]
    return torch.stack(per_encoder).mean(0)


# ============================================================================= 3. guidance


def guided_model(model, y, num_classes, cfg_scale=1.0, cfg_channels=None, guidance_low=0.0, guidance_high=1.0):
    """fn(x, t_net, t) -> network output for labels y. With cfg_scale != 1 and guidance_low <= t <=
    guidance_high (our time: the interval of Kynkaanniemi et al., high 0.7 skips the noisiest steps)
    the conditional and null-label halves run in one batch (`forward_with_cfg`); elsewhere the
    conditional prediction alone."""
    y_null = torch.full_like(y, num_classes)

    def fn(x, t_net, t):
        if cfg_scale == 1.0 or not guidance_low <= t <= guidance_high:
            out = model(x, t_net, y)
            return out[0] if isinstance(out, tuple) else out  # without REPA's projected tokens (models.prediction)
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t_net, t_net]), torch.cat([y, y_null]), cfg_scale, cfg_channels)
        return out[: len(x)]
    return fn


# ============================================================================= 4. per-sample noise


class SampleNoise:
    """Gaussian noise where sample i's draws depend only on (seed, i): the same images come out
    whatever the batch size or the number of processes (DiT, SiT and REPA seed by rank instead)."""

    def __init__(self, seed, indices, device):
        self.generators = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in indices]
        self.device = device

    def labels(self, num_classes):
        """One uniform class per sample, drawn from its own stream before any noise."""
        return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in self.generators]).to(self.device)

    def __call__(self, shape):
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)


# ============================================================================= 5. samplers

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "sde")


def _progress(steps, show):
    if not show:
        return steps
    from tqdm import tqdm

    return tqdm(steps, leave=False, desc="sampling")


@torch.no_grad()
def sample_ddpm(diffusion, fn, noise, ddim=False, progress=False):
    """Ancestral sampling over the (respaced) process: DiT's p_sample_loop, or DDIM with eta = 0."""
    x = noise(None)
    N = x.shape[0]
    for i in _progress(range(diffusion.num_timesteps - 1, -1, -1), progress):
        t = torch.full((N,), i, device=x.device, dtype=torch.long)
        output = fn(x, diffusion.network_time(t), diffusion.guidance_time(i)).float()
        mean, log_variance, x0 = diffusion.p_mean_variance(output, x, t)
        if ddim:
            abar_prev = diffusion._at(diffusion.alphas_cumprod_prev, t, x)
            eps = (diffusion._at(np.sqrt(1.0 / diffusion.alphas_cumprod), t, x) * x - x0) / diffusion._at(
                np.sqrt(1.0 / diffusion.alphas_cumprod - 1), t, x)
            x = x0 * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps
        elif i > 0:
            x = mean + torch.exp(0.5 * log_variance) * noise(x.shape[1:])
        else:
            x = mean
    return x


@torch.no_grad()
def sample_ode(transport, fn, noise, num_steps, heun=False, progress=False):
    """Probability-flow ODE from t = 1 - eps to eps on an even grid: Euler, or Heun's second order
    on every step but the last (REPA's sampler; 2 num_steps - 1 network calls)."""
    x = noise(None)
    ts = torch.linspace(1 - transport.eps, transport.eps, num_steps + 1, dtype=torch.float64)
    for i in _progress(range(num_steps), progress):
        t_cur, t_next = ts[i].item(), ts[i + 1].item()
        v = _velocity(transport, fn, x, t_cur)
        x_next = x + (t_next - t_cur) * v
        if heun and i < num_steps - 1:
            v_next = _velocity(transport, fn, x_next, t_next, t_guide=t_cur)  # REPA: the interval at t_cur
            x_next = x + (t_next - t_cur) * 0.5 * (v + v_next)
        x = x_next
    return x


@torch.no_grad()
def sample_sde(transport, fn, noise, num_steps, last_step_size=0.04, progress=False):
    """Euler-Maruyama on the reverse SDE dx = (v - w score) dt + sqrt(2 w) dW, w from
    Transport.diffusion_coefficient: num_steps - 1 stochastic steps on an even grid from 1 - eps to
    last_step_size, then one noise-free step to 0 (SiT's "Mean" last step; REPA's sampler is the same)."""
    x = noise(None)
    ts = torch.linspace(1.0 - transport.eps, last_step_size, num_steps, dtype=torch.float64).tolist() + [0.0]
    for i in _progress(range(num_steps), progress):
        t_cur, t_next = ts[i], ts[i + 1]
        dt = t_next - t_cur  # negative
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.float64)
        v = _velocity(transport, fn, x, t_cur)
        w = transport.diffusion_coefficient(t).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        drift = v - w * transport.score(v, x, t)
        x = x + drift * dt
        if i < num_steps - 1:
            x = x + torch.sqrt(2 * w * abs(dt)) * noise(x.shape[1:])
    return x


def _velocity(transport, fn, x, t_scalar, t_guide=None):
    """The velocity at t_scalar; guided where t_guide (default t_scalar) lies in the interval."""
    t = torch.full((x.shape[0],), t_scalar, device=x.device, dtype=torch.float64)
    t_guide = t_scalar if t_guide is None else t_guide
    model = lambda xt, t_net, y: fn(xt, t_net, t_guide)  # noqa: E731 (labels are bound in fn)
    return transport.velocity(transport.network_output(model, x, t, None).float(), x, t)


# ============================================================================= 6. objectives from a recipe


def make_objective(objective, model):
    """A recipe's objective dict (stored in every generator checkpoint) -> GaussianDiffusion or
    Transport. The DDPM variance is learned when the network outputs it (a DiT with learn_sigma)."""
    if objective["kind"] == "diffusion":
        learn_sigma = model.learn_sigma and model.family == "dit"
        return GaussianDiffusion(linear_betas(objective.get("num_timesteps", 1000)), learn_sigma=learn_sigma)
    return Transport(objective["path"], objective["prediction"], objective["time_input"])


def default_sampler(objective):
    return "ddpm" if objective["kind"] == "diffusion" else "sde"


def generate(model, objective, noise, y, sampler, num_steps, cfg_scale=1.0, cfg_channels=None,
             guidance_low=0.0, guidance_high=1.0, progress=False):
    """Latents for labels y (N,), starting from `noise` (a SampleNoise). DDPM/DDIM need the
    diffusion objective, euler/heun/sde the transport one."""
    fn = guided_model(model, y, model.num_classes, cfg_scale, cfg_channels, guidance_low, guidance_high)
    shape = (model.in_channels, model.config["input_size"], model.config["input_size"])
    start = lambda s: noise(shape if s is None else s)  # noqa: E731
    if isinstance(objective, GaussianDiffusion):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"--sampler {sampler} needs a transport model; a diffusion model samples with ddpm or ddim")
        return sample_ddpm(objective.respaced(num_steps), fn, start, ddim=sampler == "ddim", progress=progress)
    if sampler not in ("euler", "heun", "sde"):
        raise ValueError(f"--sampler {sampler} needs a diffusion model; a transport model samples with euler, heun or sde")
    if sampler == "sde":
        return sample_sde(objective, fn, start, num_steps, progress=progress)
    return sample_ode(objective, fn, start, num_steps, heun=sampler == "heun", progress=progress)
