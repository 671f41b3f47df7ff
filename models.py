"""Every network and its checkpoint I/O.

Rooms, in order:
  1. shared layers (ResNet block, single-head spatial attention, down/up sampling)
  2. autoencoders: LDM encoder/decoder, diagonal Gaussian posterior, AutoencoderKL, VQModel,
     PatchGAN discriminator
  3. the EQ-VAE spatial transforms tau (paper Eq. 2 and 6), the equivariance error (App. C.3),
     PSNR and LPIPS (used by training and evaluation alike)
  4. checkpoint formats: LDM/taming .ckpt, diffusers folders and state dicts, our own format,
     weights by name, diffusers export
  5. registries: AE_configs, PRETRAINED_AUTOENCODERS

Parameter names follow the LDM / taming checkpoint layout (`encoder.down.0.block.0.norm1.weight`,
`encoder.mid.attn_1.q.weight`, `quant_conv.weight`, `quantize.embedding.weight`), so the official
LDM, taming and EQ-VAE `.ckpt` files load without conversion; diffusers names are converted.
"""
import json
import math
import os
import random
import re
import warnings
import zipfile
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# ============================================================================= 1. shared layers


def Normalize(channels, groups=32):
    """GroupNorm with LDM's 32 groups and eps 1e-6 (fewer groups only for the tiny demo models)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def at_least_fp32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, dropout=0.0, groups=32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        # LDM names the 1x1 projection of the skip path `nin_shortcut`
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in LDM."""

    def __init__(self, channels, groups=32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(N, 1, C, H * W).transpose(-1, -2) for conv in (self.q, self.k, self.v))  # (N, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(N, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Strided 3x3 conv with LDM's asymmetric padding (right and bottom only)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ============================================================================= 2. autoencoders


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, double_z=True,
                 in_channels=3, resolution=256, dropout=0.0, norm_groups=32):
        super().__init__()
        self.num_levels = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        res = resolution
        for i in range(self.num_levels):
            level = nn.Module()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i != self.num_levels - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, out_channels=3,
                 resolution=256, dropout=0.0, norm_groups=32):
        super().__init__()
        self.num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        self.mid.attn_1 = AttnBlock(block_in, norm_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout, norm_groups)
        # up[i] is the level at resolution / 2**i, built from the lowest resolution upwards (LDM order)
        up = []
        for i in reversed(range(self.num_levels)):
            level = nn.Module()
            block_out = ch * ch_mult[i]
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, norm_groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)); logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments):
        self.mean, logvar = torch.chunk(at_least_fp32(moments), 2, dim=1)  # the KL in fp32 under autocast
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL to N(0, I), summed over C, H, W: one value per image."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """The LDM KL autoencoder shared by SD-VAE, SDXL-VAE, SD3-VAE and LDM kl-f16.

    `scaling_factor`/`shift_factor`: latent normalisation for generators, latent = (z - shift) * scale.
    """

    kind = "kl"

    def __init__(self, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(), z_channels=4,
                 embed_dim=4, use_quant_conv=True, in_channels=3, out_channels=3, resolution=256, dropout=0.0,
                 norm_groups=32, scaling_factor=1.0, shift_factor=0.0):
        super().__init__()
        self.config = dict(kind="kl", ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), z_channels=z_channels, embed_dim=embed_dim,
                           use_quant_conv=use_quant_conv, in_channels=in_channels, out_channels=out_channels,
                           resolution=resolution, dropout=dropout, norm_groups=norm_groups,
                           scaling_factor=scaling_factor, shift_factor=shift_factor)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.latent_channels = embed_dim
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, True, in_channels, resolution,
                               dropout, norm_groups)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, out_channels, resolution,
                               dropout, norm_groups)
        if use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        else:
            assert embed_dim == z_channels, "without quant convs the latent has z_channels channels"
            self.quant_conv = self.post_quant_conv = None

    def encode(self, x):
        """Image in [-1, 1] -> posterior over latents (N, embed_dim, H/f, W/f)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, sample_posterior=True, latent_fn=None):
        """D(latent_fn(z)), z ~ q(z|x): latent_fn = tau gives EQ-VAE's D(tau(E(x))) (Eq. 5)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        if latent_fn is not None:
            z = latent_fn(z)
        return self.decode(z), posterior

    def encode_features(self, x):
        """What EQ-VAE transforms and the equivariance error compares: the posterior mean."""
        return self.encode(x).mean

    def decode_features(self, h):
        """D for what `encode_features` returns (deterministic reconstruction: D(E(x)))."""
        return self.decode(h)

    def last_layer(self):
        """Weight at which LDM's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantizer with straight-through gradients (taming `VectorQuantizer2`).

    `legacy=True` reproduces taming's released loss: beta weights the codebook term and the
    commitment term is unweighted (the "beta bug"); `legacy=False` is VQ-VAE's form.
    """

    def __init__(self, n_embed, embed_dim, beta=0.25, legacy=True):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy = n_embed, embed_dim, beta, legacy
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, h):
        h = at_least_fp32(h)  # nearest-code search in fp32: bf16 distances would pick wrong codes
        N, C, H, W = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, C)  # (NHW, C)
        codebook = self.embedding.weight
        # squared distances without materialising (NHW, K, C): |h|^2 + |e|^2 - 2 h.e
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2.0 * flat @ codebook.t()
        indices = dist.argmin(dim=1)
        zq = self.embedding(indices).view(N, H, W, C).permute(0, 3, 1, 2)
        codebook_term = F.mse_loss(zq, h.detach())
        commitment_term = F.mse_loss(zq.detach(), h)
        loss = (self.beta * codebook_term + commitment_term) if self.legacy else (codebook_term + self.beta * commitment_term)
        zq = h + (zq - h).detach()  # straight-through estimator
        return zq, loss, indices.view(N, H, W)


class VQModel(nn.Module):
    """The taming-transformers VQGAN (what MaskGIT uses)."""

    kind = "vq"

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256,
                 embed_dim=256, n_embed=1024, beta=0.25, legacy=True, in_channels=3, out_channels=3,
                 resolution=256, dropout=0.0, norm_groups=32, scaling_factor=1.0, shift_factor=0.0):
        super().__init__()
        self.config = dict(kind="vq", ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), z_channels=z_channels, embed_dim=embed_dim,
                           n_embed=n_embed, beta=beta, legacy=legacy, in_channels=in_channels,
                           out_channels=out_channels, resolution=resolution, dropout=dropout,
                           norm_groups=norm_groups, scaling_factor=scaling_factor, shift_factor=shift_factor)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.latent_channels = embed_dim
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, False, in_channels, resolution,
                               dropout, norm_groups)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, out_channels, resolution,
                               dropout, norm_groups)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta, legacy)

    def encode_features(self, x):
        """Pre-quantization features: where EQ-VAE applies tau for discrete models (Sec. 3.3)."""
        return self.quant_conv(self.encoder(x))

    def quantize_features(self, h):
        """-> (quantized latents, VQ loss, indices (N, H, W))."""
        return self.quantize(h)

    def decode(self, zq):
        return self.decoder(self.post_quant_conv(zq))

    def decode_features(self, h):
        """D for pre-quantization features: quantize, then decode (tau acts before quantization)."""
        return self.decode(self.quantize(h)[0])

    def decode_indices(self, indices):
        zq = self.quantize.embedding(indices).permute(0, 3, 1, 2)  # (N, H, W) -> (N, C, H, W)
        return self.decode(zq)

    def forward(self, x, latent_fn=None):
        """For EQ-VAE, latent_fn = tau acts on the features before quantization (Sec. 3.3)."""
        h = self.encode_features(x)
        if latent_fn is not None:
            h = latent_fn(h)
        zq, vq_loss, indices = self.quantize(h)
        return self.decode(zq), vq_loss, indices

    def last_layer(self):
        return self.decoder.conv_out.weight


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix), as used by LDM and taming: n_layers strided 4x4 convs with
    BatchNorm and LeakyReLU(0.2), then a stride-1 stage and a 1-channel patch logit map."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init, as in LDM
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


# ============================================================================= 3. EQ-VAE transforms


class EqTransform(NamedTuple):
    """tau = S(sx, sy) . R(k * 90 deg) for a latent of size (lat_h, lat_w).

    Scales are stored as target latent sizes, so the image (f times larger) is resized to exactly
    f times the transformed latent: tau(x) and D(tau(E(x))) always have the same shape.
    """

    k: int  # quarter turns, counter-clockwise
    lat_h: int
    lat_w: int
    new_h: int
    new_w: int

    @property
    def is_identity(self):
        return self.k % 4 == 0 and (self.new_h, self.new_w) == (self.lat_h, self.lat_w)

    @property
    def scale(self):
        return self.new_h / self.lat_h, self.new_w / self.lat_w


EQ_MODES = ("rotation", "scale", "anisotropic", "rotation+scale", "rotation+anisotropic")


def scale_grid(latent_side, min_scale=0.25):
    """Target latent sides n with min_scale <= n / latent_side < 1 (the official code: 8..31 for 32)."""
    lo = max(1, math.ceil(min_scale * latent_side - 1e-9))
    return list(range(lo, latent_side)) or [latent_side]


def eq_transform(lat_h, lat_w, k=0, scale=1.0, scale_w=None):
    """A fixed tau: k quarter turns and scale (or scale, scale_w), rounded to whole latent pixels."""
    sh, sw = scale, scale if scale_w is None else scale_w
    return EqTransform(k % 4, lat_h, lat_w, max(1, round(sh * lat_h)), max(1, round(sw * lat_w)))


def sample_eq_transform(lat_h, lat_w, mode="rotation+scale", angles=(1, 2, 3), scales=None, rng=random):
    """Draw tau as in Sec. 3.3: k uniform in `angles` (quarter turns), s uniform on the 1/latent grid
    in [0.25, 1), or uniform in the discrete set `scales` when given. Anisotropic modes draw sx, sy
    independently."""
    if mode not in EQ_MODES:
        raise ValueError(f"unknown EQ mode {mode!r}: choose from {EQ_MODES}")
    k = rng.choice(list(angles)) if mode.startswith("rotation") else 0
    if mode == "rotation":
        return EqTransform(k, lat_h, lat_w, lat_h, lat_w)

    def draw(side):
        if scales:
            return max(1, round(rng.choice(list(scales)) * side))
        return rng.choice(scale_grid(side))

    if mode.endswith("anisotropic"):
        return EqTransform(k, lat_h, lat_w, draw(lat_h), draw(lat_w))
    if scales:
        s = rng.choice(list(scales))
        return EqTransform(k, lat_h, lat_w, max(1, round(s * lat_h)), max(1, round(s * lat_w)))
    n = rng.choice(scale_grid(lat_h))  # isotropic: one fraction n / lat_h for both axes
    return EqTransform(k, lat_h, lat_w, n, max(1, round(n * lat_w / lat_h)))


INTERPOLATIONS = ("bicubic", "bilinear", "area", "nearest")


def apply_eq_transform(x, t, interp="bicubic", antialias=False):
    """Apply tau to a (N, C, H, W) image or latent whose size is a multiple of the latent size.

    interp: bicubic (the paper), bilinear (the official code, no antialias), area (box filter),
    nearest. `antialias` low-pass filters bilinear/bicubic downscaling (PyTorch's antialias).

    Paper Eq. 6: tau = S . R, so the rotation acts first, then the scaling. Quarter turns are exact
    (torch.rot90), so rotating first never touches interpolation.
    """
    if t.is_identity:
        return x
    H, W = x.shape[-2:]
    if H % t.lat_h or W % t.lat_w or H // t.lat_h != W // t.lat_w:
        raise ValueError(f"tensor of size {H}x{W} is not a multiple of the latent size {t.lat_h}x{t.lat_w}")
    f = H // t.lat_h
    new_h, new_w = t.new_h * f, t.new_w * f
    if t.k % 2 == 1:  # a quarter turn swaps the axes, so the targets swap too
        new_h, new_w = new_w, new_h
    if t.k:
        x = torch.rot90(x, t.k, dims=(-2, -1))
    if x.shape[-2:] != (new_h, new_w):
        align = False if interp in ("bilinear", "bicubic") else None
        x = F.interpolate(x, size=(new_h, new_w), mode=interp, align_corners=align,
                          antialias=antialias and interp in ("bilinear", "bicubic"))
    return x


# Appendix C.3: the transformation sets of the equivariance error.
EQ_EVAL_ROTATIONS = (1, 2, 3)  # pi/2, pi, 3pi/2 as quarter turns
EQ_EVAL_SCALES = (0.25, 0.5, 0.75)


@torch.no_grad()
def equivariance_error(model, x, transforms, interp="bicubic", antialias=False):
    """App. C.3: per image, the mean over tau of ||tau E(x) - E(tau x)||^2 / ||E(tau x)||^2.

    E is `encode_features`: the posterior mean for KL models, pre-quantization features for VQ.
    Returns a (N,) tensor (callers average over images and ranks).
    """
    z = model.encode_features(x).float()
    errors = []
    for t in transforms:
        tz = apply_eq_transform(z, t, interp, antialias)
        ztx = model.encode_features(apply_eq_transform(x, t, interp, antialias)).float()
        errors.append((tz - ztx).pow(2).sum(dim=[1, 2, 3]) / ztx.pow(2).sum(dim=[1, 2, 3]).clamp_min(1e-12))
    return torch.stack(errors).mean(0)


def eval_transforms(lat_h, lat_w, kind):
    """T_r (rotations) or T_s (scales) of App. C.3 for a latent of this size."""
    if kind == "rotation":
        return [eq_transform(lat_h, lat_w, k=k) for k in EQ_EVAL_ROTATIONS]
    return [eq_transform(lat_h, lat_w, scale=s) for s in EQ_EVAL_SCALES]


def to_uint8(x):
    """[-1, 1] float images -> uint8 with DiT's rounding (127.5 x + 128, clamped)."""
    return (x * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


def psnr(x, y):
    """Per-image PSNR in dB between [-1, 1] images, on uint8-quantized values (inf when equal)."""
    mse = (to_uint8(x).float() - to_uint8(y).float()).pow(2).flatten(1).mean(1)
    return 20 * torch.log10(torch.tensor(255.0, device=mse.device)) - 10 * torch.log10(mse)


def load_lpips(random_backbone=False):
    """LPIPS-VGG (v0.1) from the `lpips` package, frozen, inputs in [-1, 1].

    Its linear heads ship with the package; the VGG16 backbone comes from torchvision's ImageNet
    weights, which must be downloadable or already in torch's hub cache. `random_backbone=True`
    uses a random VGG (tests, offline demos): the numbers are then not comparable to anything.
    """
    import lpips

    try:
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            net = lpips.LPIPS(net="vgg", pnet_rand=random_backbone, verbose=False)
    except Exception as e:
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"LPIPS could not load torchvision's VGG16 ImageNet weights ({e}). Download "
            f"https://download.pytorch.org/models/vgg16-397923af.pth into {hub}, "
            f"or pass --lpips-random for a random backbone (numbers then not comparable)."
        ) from None
    return net.eval().requires_grad_(False)


# ============================================================================= 4. checkpoint formats

FORMAT_TAG = "eqvae-autoencoder"


def build_autoencoder(config):
    """Our config dict (as stored in `model.config`) -> a freshly initialised model."""
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    if config.get("kind", "kl") == "vq":
        return VQModel(**kwargs)
    for key in ("n_embed", "beta", "legacy"):
        kwargs.pop(key, None)
    return AutoencoderKL(**kwargs)


def _levels(sd, prefix):
    return sorted({int(m.group(1)) for k in sd for m in [re.match(prefix + r"\.(\d+)\.", k)] if m})


def config_from_state_dict(sd, resolution=256):
    """Infer the architecture from an LDM/taming-named state dict (shapes and key presence)."""
    if "encoder.conv_in.weight" not in sd:
        raise KeyError("no encoder.conv_in.weight: not an LDM/taming autoencoder state dict")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _levels(sd, r"encoder\.down")
    ch_mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    num_res_blocks = len(_levels(sd, r"encoder\.down\.0\.block"))
    attn_resolutions = [resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
    enc_out = sd["encoder.conv_out.weight"].shape[0]
    config = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                  in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                  resolution=resolution)
    if "quantize.embedding.weight" in sd:
        n_embed, embed_dim = sd["quantize.embedding.weight"].shape
        return dict(kind="vq", z_channels=enc_out, embed_dim=embed_dim, n_embed=n_embed, **config)
    use_quant_conv = "quant_conv.weight" in sd
    embed_dim = sd["quant_conv.weight"].shape[0] // 2 if use_quant_conv else enc_out // 2
    return dict(kind="kl", z_channels=enc_out // 2, embed_dim=embed_dim, use_quant_conv=use_quant_conv, **config)


def default_scaling(config):
    """Latent scale/shift for a checkpoint that does not carry them: the LDM convention for the
    kl-f8 4-channel family (0.18215), otherwise identity (recompute from data for generators)."""
    if config["kind"] == "kl" and config["embed_dim"] == 4 and len(config["ch_mult"]) == 4:
        return 0.18215, 0.0
    return 1.0, 0.0


# --- diffusers <-> ours key mapping -------------------------------------------------------------

_ATTN_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_OLD_DIFFUSERS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _ours_to_diffusers_key(key, num_levels):
    """One LDM-named key -> its diffusers name (None for keys diffusers does not have)."""
    m = re.match(r"(encoder|decoder)\.(.*)", key)
    if not m:
        return key  # quant_conv / post_quant_conv keep their names
    part, rest = m.groups()
    rest = rest.replace("norm_out.", "conv_norm_out.")
    rest = re.sub(r"^mid\.block_(\d)\.", lambda g: f"mid_block.resnets.{int(g.group(1)) - 1}.", rest)
    rest = re.sub(r"^mid\.attn_1\.", "mid_block.attentions.0.", rest)
    if part == "encoder":
        rest = re.sub(r"^down\.(\d+)\.block\.", r"down_blocks.\1.resnets.", rest)
        rest = re.sub(r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions.", rest)
        rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
    else:  # diffusers orders decoder levels from the lowest resolution
        flip = lambda g: f"up_blocks.{num_levels - 1 - int(g.group(1))}.{g.group(2)}"
        rest = re.sub(r"^up\.(\d+)\.(block|attn|upsample)\.",
                      lambda g: flip(g).replace(".block", ".resnets").replace(".attn", ".attentions")
                      .replace(".upsample", ".upsamplers.0") + ".", rest)
    rest = rest.replace("nin_shortcut.", "conv_shortcut.")
    if "attentions." in rest:
        head, leaf, param = rest.rsplit(".", 2)
        rest = f"{head}.{_ATTN_DIFFUSERS[leaf]}.{param}"
    return f"{part}.{rest}"


def _is_attn_proj(key):
    return re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", key) is not None


def diffusers_to_ours(sd_diffusers, model):
    """Convert a diffusers AutoencoderKL state dict to the names of `model`, strictly: every key of
    the model must be found and every diffusers key consumed, otherwise the error lists them."""
    sd = {}
    for k, v in sd_diffusers.items():  # pre-0.15 diffusers attention names
        for old, new in _ATTN_OLD_DIFFUSERS.items():
            k = re.sub(rf"(attentions\.\d+)\.{old}\.", rf"\1.{new}.", k)
        sd[k] = v
    ours = {}
    missing = []
    for key, ref in model.state_dict().items():
        dkey = _ours_to_diffusers_key(key, len(model.config["ch_mult"]))
        if dkey not in sd:
            missing.append(f"{key} (diffusers: {dkey})")
            continue
        value = sd.pop(dkey)
        ours[key] = value.reshape(ref.shape) if _is_attn_proj(dkey) else value  # Linear [C,C] -> 1x1 conv
    if missing or sd:
        raise KeyError(_mismatch_message("diffusers checkpoint", missing, sorted(sd)))
    return ours


def ours_to_diffusers(model):
    sd = {}
    num_levels = len(model.config["ch_mult"])
    for key, value in model.state_dict().items():
        dkey = _ours_to_diffusers_key(key, num_levels)
        sd[dkey] = value.reshape(value.shape[:2]) if _is_attn_proj(dkey) else value
    return sd


def config_from_diffusers(cfg):
    """diffusers config.json dict -> our config."""
    boc = cfg["block_out_channels"]
    ch = boc[0]
    resolution = cfg.get("sample_size", 256)
    resolution = resolution[0] if isinstance(resolution, (list, tuple)) else resolution
    if cfg.get("use_quant_conv", True) != cfg.get("use_post_quant_conv", True):
        raise ValueError("diffusers config with only one of use_quant_conv/use_post_quant_conv is not supported")
    if not cfg.get("mid_block_add_attention", True):
        raise ValueError("diffusers config without mid-block attention is not an LDM autoencoder")
    attn_levels = [i for i, t in enumerate(cfg.get("down_block_types", [])) if t.startswith("Attn")]
    scaling = cfg.get("scaling_factor", 0.18215)
    shift = cfg.get("shift_factor") or 0.0
    return dict(kind="kl", ch=ch, ch_mult=[c // ch for c in boc], num_res_blocks=cfg.get("layers_per_block", 2),
                attn_resolutions=[resolution // 2**i for i in attn_levels], z_channels=cfg["latent_channels"],
                embed_dim=cfg["latent_channels"], use_quant_conv=cfg.get("use_quant_conv", True),
                in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                resolution=resolution, dropout=0.0, norm_groups=cfg.get("norm_num_groups", 32),
                scaling_factor=scaling, shift_factor=shift)


def config_from_diffusers_state(sd, resolution=256):
    """Architecture of a bare diffusers-named state dict (no config.json)."""
    levels = _levels(sd, r"encoder\.down_blocks")
    boc = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels]
    attn = [i for i in levels if any(k.startswith(f"encoder.down_blocks.{i}.attentions.") for k in sd)]
    latent = sd["encoder.conv_out.weight"].shape[0] // 2
    cfg = dict(block_out_channels=boc, layers_per_block=len(_levels(sd, r"encoder\.down_blocks\.0\.resnets")),
               latent_channels=latent, use_quant_conv="quant_conv.weight" in sd,
               use_post_quant_conv="post_quant_conv.weight" in sd, sample_size=resolution,
               down_block_types=["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in levels],
               in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0])
    config = config_from_diffusers(cfg)
    config["scaling_factor"], config["shift_factor"] = default_scaling(config)
    return config


def export_diffusers(model, folder):
    """Write `folder` (config.json + diffusion_pytorch_model.safetensors) that diffusers'
    `AutoencoderKL.from_pretrained(folder)` loads and that reproduces our outputs."""
    from safetensors.torch import save_file

    c = model.config
    if c["kind"] != "kl":
        raise ValueError("only KL autoencoders can be exported to the diffusers AutoencoderKL format")
    if c["z_channels"] != c["embed_dim"]:
        raise ValueError("diffusers AutoencoderKL needs z_channels == embed_dim")
    levels = range(len(c["ch_mult"]))
    attn = [c["resolution"] // 2**i in c["attn_resolutions"] for i in levels]
    cfg = {
        "_class_name": "AutoencoderKL",
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [c["ch"] * m for m in c["ch_mult"]],
        "layers_per_block": c["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": c["embed_dim"],
        "norm_num_groups": c["norm_groups"],
        "sample_size": c["resolution"],
        "scaling_factor": model.scaling_factor,
        "shift_factor": model.shift_factor if model.shift_factor else None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": c["use_quant_conv"],
        "use_post_quant_conv": c["use_quant_conv"],
        "mid_block_add_attention": True,
    }
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in ours_to_diffusers(model).items()}
    save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


# --- reading files -------------------------------------------------------------------------------


def _mismatch_message(what, missing, unexpected):
    lines = [f"{what} does not match the model architecture (strict loading):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
    return "\n".join(lines)


def _read_state_file(path, trust_checkpoint):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return utils.load_checkpoint(path, trust_checkpoint)


def _split_state(obj):
    """A loaded file -> (autoencoder state dict, training-only extras such as `loss.*`, config or None)."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        return obj["state_dict"], obj.get("extras", {}), obj["config"]
    if isinstance(obj, dict) and "autoencoder_config" in obj and "model" in obj:  # a train_vae.py checkpoint
        extras = {f"loss.discriminator.{k}": v for k, v in obj.get("discriminator", {}).items()}
        if obj.get("logvar") is not None:
            extras["loss.logvar"] = obj["logvar"]
        return (obj.get("ema") or obj["model"]), extras, obj["autoencoder_config"]
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("the file holds no state dict of tensors")
    if any(k.startswith("first_stage_model.") for k in sd):  # a whole LDM: take its autoencoder
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    extras = {k: v for k, v in sd.items() if k.startswith("loss.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    return sd, extras, None


def _load_strict(model, sd, what):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}" for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        msg = _mismatch_message(what, missing, unexpected)
        if bad_shape:
            msg += "\n  shape mismatches: " + ", ".join(bad_shape[:20])
        raise KeyError(msg)
    model.load_state_dict(sd, strict=True)


def _load_diffusers_folder(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return cfg, path
    raise FileNotFoundError(f"{folder} has config.json but no diffusion_pytorch_model.safetensors or .bin")


def load_autoencoder(spec, trust_checkpoint=False, return_extras=False):
    """Build and load an autoencoder from any supported spec.

    spec: a name in PRETRAINED_AUTOENCODERS (downloaded once into the cache dir), `scratch:CONFIG`
    (random init of an AE_configs entry), a diffusers folder, or a file: LDM/taming `.ckpt`,
    `.safetensors`/`.bin` state dict (LDM or diffusers names), our `.pt`, or a train_vae.py checkpoint.
    The format is detected from the keys; loading is strict. `return_extras` also returns the
    training-only entries (`loss.*` of an LDM/taming ckpt: discriminator and logvar).
    """
    spec = str(spec)
    extras = {}
    if spec.startswith("scratch:"):
        name = spec.split(":", 1)[1]
        if name not in AE_configs:
            raise ValueError(f"unknown autoencoder config {name!r} in {spec!r}: choose from {sorted(AE_configs)}")
        model = build_autoencoder(AE_configs[name])
        return (model, extras) if return_extras else model
    if spec in PRETRAINED_AUTOENCODERS:
        # under torchrun rank 0 downloads first; the others then find the file in the cache
        if utils.is_main():
            spec = fetch_pretrained(spec)
            utils.barrier()
        else:
            utils.barrier()
            spec = fetch_pretrained(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{spec} is a folder without config.json: not a diffusers autoencoder folder")
        cfg, path = _load_diffusers_folder(spec)
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{spec}: diffusers class {cfg['_class_name']} is not supported (AutoencoderKL only)")
        model = build_autoencoder(config_from_diffusers(cfg))
        sd = diffusers_to_ours(_read_state_file(path, trust_checkpoint), model)
    elif os.path.isfile(spec):
        sd, extras, config = _split_state(_read_state_file(spec, trust_checkpoint))
        if any(k.startswith("encoder.down_blocks.") for k in sd):
            model = build_autoencoder(config_from_diffusers_state(sd))
            sd = diffusers_to_ours(sd, model)
        else:
            if config is None:
                config = config_from_state_dict(sd)
                config["scaling_factor"], config["shift_factor"] = default_scaling(config)
            model = build_autoencoder(config)
    else:
        raise FileNotFoundError(
            f"autoencoder {spec!r} is neither a file, a folder, scratch:CONFIG nor a known name "
            f"({', '.join(sorted(PRETRAINED_AUTOENCODERS))})"
        )
    _load_strict(model, sd, spec)
    return (model, extras) if return_extras else model


def save_autoencoder(model, path, extras=None):
    """Our format: config + state dict (+ optional training extras), written atomically."""
    model = utils.unwrap(model)
    utils.save_checkpoint({"format": FORMAT_TAG, "config": dict(model.config, scaling_factor=model.scaling_factor,
                                                                shift_factor=model.shift_factor),
                           "state_dict": model.state_dict(), "extras": extras or {}}, path)


def fetch_pretrained(name):
    """Download a named autoencoder into the cache dir once; returns a local file or folder."""
    entry = PRETRAINED_AUTOENCODERS[name]
    if entry["format"] == "diffusers":
        repo = entry["repo"]
        base = f"https://huggingface.co/{repo}/resolve/main/" + (entry.get("subfolder", "") + "/" if entry.get("subfolder") else "")
        utils.download(base + "config.json", os.path.join(name, "config.json"))
        path = utils.download(base + "diffusion_pytorch_model.safetensors", os.path.join(name, "diffusion_pytorch_model.safetensors"))
        return os.path.dirname(path)
    if entry["format"] == "ldm-zip":
        ckpt = os.path.join(utils.cache_dir(), name, "model.ckpt")
        if not os.path.isfile(ckpt):
            archive = utils.download(entry["url"], os.path.join(name, os.path.basename(entry["url"])))
            if not zipfile.is_zipfile(archive):
                raise RuntimeError(f"{archive} is not a zip archive (a broken download?): delete it and retry")
            with zipfile.ZipFile(archive) as z:
                member = next((m for m in z.namelist() if m.endswith(".ckpt")), None)
                if member is None:
                    raise RuntimeError(f"{archive} holds no .ckpt file: delete it and retry")
                with z.open(member) as src, open(ckpt + ".part", "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(ckpt + ".part", ckpt)
        return ckpt
    return utils.download(entry["url"], os.path.join(name, entry["filename"]))


# ============================================================================= 5. registries

# Architectures (LDM configs). `tiny`/`tiny-vq` are for CPU tests and the demo.
AE_configs = {
    "kl-f8": dict(kind="kl", ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], z_channels=4,
                  embed_dim=4, use_quant_conv=True, scaling_factor=0.18215),
    "kl-f8-c16": dict(kind="kl", ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], z_channels=16,
                      embed_dim=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
    "kl-f16-c16": dict(kind="kl", ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                       z_channels=16, embed_dim=16, use_quant_conv=True),
    "vq-f16-1024": dict(kind="vq", ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16],
                        z_channels=256, embed_dim=256, n_embed=1024),
    "tiny": dict(kind="kl", ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4,
                 embed_dim=4, use_quant_conv=True, resolution=64, norm_groups=8),
    "tiny-vq": dict(kind="vq", ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[16], z_channels=16,
                    embed_dim=16, n_embed=64, resolution=64, norm_groups=8),
}

# Published weights by name. diffusers repos download config.json + safetensors; LDM releases
# are zips holding model.ckpt; taming's VQGAN is a Lightning .ckpt.
PRETRAINED_AUTOENCODERS = {
    "sd-vae-ft-ema": dict(format="diffusers", repo="stabilityai/sd-vae-ft-ema"),
    "sd-vae-ft-mse": dict(format="diffusers", repo="stabilityai/sd-vae-ft-mse"),
    "sdxl-vae": dict(format="diffusers", repo="stabilityai/sdxl-vae"),
    "eq-vae": dict(format="diffusers", repo="zelaki/eq-vae"),
    "eq-vae-ema": dict(format="diffusers", repo="zelaki/eq-vae-ema"),
    "kl-f8": dict(format="ldm-zip", url="https://ommer-lab.com/files/latent-diffusion/kl-f8.zip"),
    "kl-f16": dict(format="ldm-zip", url="https://ommer-lab.com/files/latent-diffusion/kl-f16.zip"),
    "vq-f16-1024": dict(format="ckpt", url="https://heibox.uni-heidelberg.de/f/140747ba53464f49b476/?dl=1",
                        filename="last.ckpt"),
}
