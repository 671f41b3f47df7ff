"""Every network and its checkpoint I/O.

Rooms, in order:
  1. shared layers (ResNet block, single-head spatial attention, down/up sampling)
  2. autoencoders: LDM encoder/decoder, diagonal Gaussian posterior, AutoencoderKL, VQModel,
     PatchGAN discriminator
  3. the EQ-VAE spatial transforms tau (paper Eq. 2 and 6), the equivariance error (App. C.3),
     PSNR and LPIPS (used by training and evaluation alike)
  4. DiT / SiT: embedders, adaLN-Zero blocks, the backbone with classifier-free guidance and
     REPA's projectors
  5. DINOv2: the ViT encoder whose patch tokens are REPA's alignment targets
  6. MaskGIT transformer: the bidirectional token transformer, its masking schedules and its
     confidence-based decoding loop
  7. checkpoint formats: LDM/taming .ckpt, diffusers folders and state dicts, our own format,
     weights by name, diffusers export; generator checkpoints (ours and the released DiT/SiT/REPA);
     DINOv2 weights; MaskGIT checkpoints (ours and MaskGIT-pytorch's)
  8. registries: AE_configs, PRETRAINED_AUTOENCODERS, DiT_models, SiT_models, PRETRAINED_GENERATORS,
     DINOv2_models, MaskGIT_models, PRETRAINED_MASKGIT

Parameter names follow the LDM / taming checkpoint layout (`encoder.down.0.block.0.norm1.weight`,
`encoder.mid.attn_1.q.weight`, `quant_conv.weight`, `quantize.embedding.weight`), so the official
LDM, taming and EQ-VAE `.ckpt` files load without conversion; diffusers names are converted. The
generators use the official DiT names (`x_embedder.proj.weight`, `blocks.0.adaLN_modulation.1.weight`),
REPA's for the projectors (`projectors.0.0.weight`), and DINOv2 those of its released weights;
MaskGIT-pytorch's names (`transformer.layers.0.0.fn.mha.in_proj_weight`) are converted.
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
        # squared distances without materialising (NHW, K, C): |h|^2 + |e|^2 - 2 h.e, the product
        # without TF32 (the trainers switch it on; taming and MaskGIT encode without it)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2.0 * flat @ codebook.t()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
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


# ============================================================================= 4. DiT / SiT
# Peebles and Xie 2023 (DiT) and Ma et al. 2024 (SiT, the same network fed continuous time).
# Parameter names and initialisation follow the official code, so the released checkpoints load
# strictly by name; attention is SDPA instead of timm's.


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, per sample; x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t, dim, max_period=10000):
    """GLIDE's sinusoidal embedding, cosines first; t may be fractional (SiT) or integer (DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class `num_classes`, that label dropout (and
    the unconditional half of classifier-free guidance) uses."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with T = (H / p) * (W / p): one strided conv (timm's PatchEmbed)."""

    def __init__(self, input_size, patch_size, in_channels, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj), through SDPA. qk_norm:
    timm's LayerNorm over each head's queries and keys (REPA's --qk-norm; `q_norm.weight`, ...)."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (N, heads, T, D/heads)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, gelu="tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu = gelu  # DiT's tanh-approximated GELU; DINOv2's is exact ("none")

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the conditioning regresses shift, scale and a gate for attention and MLP."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def prediction(out):
    """The denoising output of a forward call, without REPA's projected tokens if it has them."""
    return out[0] if isinstance(out, tuple) else out


def sincos_pos_embed_2d(dim, grid_size):
    """MAE's fixed 2-D sin-cos table, (grid_size^2, dim): first half of the channels encodes the
    column (x) coordinate, second half the row; in each half sines, then cosines."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]  # (T, d/2)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64), torch.arange(grid_size, dtype=torch.float64), indexing="ij")
    return torch.cat([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], dim=1).float()


def build_projector(hidden_size, projector_dim, z_dim):
    """REPA's projector h_phi: an MLP from the network's hidden tokens to one encoder's features."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                         nn.Linear(projector_dim, z_dim))


class DiT(nn.Module):
    """The DiT backbone. `family="sit"` is SiT's variant of the same network: its forward drops the
    learned-sigma half of the output (SiT keeps `learn_sigma` only so its checkpoint's shapes load).
    z_dims adds REPA's projectors (Yu et al. 2025), one per target encoder, reading the hidden
    tokens after block `encoder_depth`; REPA's SiT predicts no variance, so learn_sigma defaults
    to False with projectors and True without.

    forward(x, t, y): x (N, C, H, W) latents, t (N,) timesteps (DiT: integers 0..999; SiT:
    continuous), y (N,) labels in [0, num_classes]; num_classes is the null class. With
    projectors it returns (output, [(N, T, z_dim) per encoder]) like REPA's SiT.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=None, family="dit", z_dims=(),
                 encoder_depth=8, projector_dim=2048, qk_norm=False):
        super().__init__()
        if family not in ("dit", "sit"):
            raise ValueError(f"family {family!r}: use dit or sit")
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not a multiple of the patch size {patch_size}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder depth {encoder_depth} must be between 1 and the model's depth {depth}")
        learn_sigma = not z_dims if learn_sigma is None else learn_sigma
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                           num_classes=num_classes, learn_sigma=learn_sigma, family=family, z_dims=list(z_dims),
                           encoder_depth=encoder_depth, projector_dim=projector_dim, qk_norm=qk_norm)
        self.learn_sigma, self.family, self.encoder_depth = learn_sigma, family, encoder_depth
        self.in_channels, self.num_classes = in_channels, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.num_heads = patch_size, num_heads
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # a frozen parameter, not a buffer: the official checkpoints carry it under this name
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)])
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in z_dims]) if z_dims else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's initialisation: xavier linears (REPA's projectors too), adaLN-Zero (zeroed
        modulation and output layer)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], int(self.x_embedder.num_patches ** 0.5))[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv initialised like a linear layer
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if self.projectors is not None and i + 1 == self.encoder_depth:
                zs = [projector(x) for projector in self.projectors]  # (N, T, z_dim) each
        x = self.unpatchify(self.final_layer(x, c))  # (N, out_channels, H, W)
        if self.family == "sit" and self.learn_sigma:
            x = x[:, : self.in_channels]
        return x if self.projectors is None else (x, zs)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        """Classifier-free guidance in one batch. The first half of x/t/y is conditional, the second
        half the same inputs with the null label; both halves of the output get
        uncond + cfg_scale * (cond - uncond) on the first `cfg_channels` channels (default: every
        predicted latent channel); the other channels (the learned variance) stay as predicted.
        The official DiT and SiT guide 3 of 4 channels: cfg_channels=3 reproduces them."""
        half = x[: len(x) // 2]
        out = prediction(self.forward(torch.cat([half, half]), t, y)).float()  # the mix in fp32, as DiT and SiT
        k = self.in_channels if cfg_channels is None else cfg_channels
        guided, rest = out[:, :k], out[:, k:]
        cond, uncond = guided.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# ============================================================================= 5. DINOv2
# Oquab et al. 2024, as released through torch.hub (facebookresearch/dinov2): parameter names are
# those of the released `*_pretrain.pth` files, attention is SDPA instead of xformers. REPA aligns
# SiT's hidden tokens with its normalised patch tokens.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1.0):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class SwiGLU(nn.Module):
    """ViT-g's feed-forward: silu(x W1) * (x W2), one fused w12 projection, hidden size cut to 2/3
    and rounded up to a multiple of 8 as in DINOv2's SwiGLUFFNFused."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class DINOv2Block(nn.Module):
    """Pre-norm ViT block with layer scale (ls1, ls2); no stochastic depth (inference only here)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn="mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio)) if ffn == "swiglu" else Mlp(dim, int(dim * mlp_ratio), gelu="none")
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2's DinoVisionTransformer at the released configuration (518-px position table, patch
    14, layer scale 1.0). forward_features(x) returns the official dict (`x_norm_patchtokens`
    (N, T, D), `x_norm_clstoken`, ...); forward(x) the normalised class token, as the hub model."""

    def __init__(self, embed_dim=768, depth=12, num_heads=12, patch_size=14, img_size=518, num_register_tokens=0,
                 ffn="mlp", interpolate_antialias=False, interpolate_offset=0.1):
        super().__init__()
        self.embed_dim, self.patch_size, self.num_register_tokens = embed_dim, patch_size, num_register_tokens
        self.interpolate_antialias, self.interpolate_offset = interpolate_antialias, interpolate_offset
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.blocks = nn.ModuleList([DINOv2Block(embed_dim, num_heads, ffn=ffn) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # DINOv2's initialisation (what a random encoder gets; released weights replace it)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """The position table for an h x w patch grid, DINOv2's way: unchanged at the stored grid,
        else bicubic from it (scale factors with DINOv2's 0.1 offset; the register models give the
        size and antialias instead)."""
        M = math.isqrt(self.pos_embed.shape[1] - 1)
        if h == w == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        if self.interpolate_offset:
            size = dict(scale_factor=((h + self.interpolate_offset) / M, (w + self.interpolate_offset) / M))
        else:
            size = dict(size=(h, w))
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **size)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1).to(self.pos_embed.dtype)

    @torch.no_grad()
    def resample_pos_embed(self, grid):
        """Replace the stored table by one for a grid x grid patch grid, as REPA does once before
        training (timm's resample_abs_pos_embed: bicubic, antialiased); the class position stays."""
        M = math.isqrt(self.pos_embed.shape[1] - 1)
        table = self.pos_embed.float()[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        self.pos_embed = nn.Parameter(torch.cat([self.pos_embed[:, :1], table.to(self.pos_embed.dtype)], dim=1),
                                      requires_grad=self.pos_embed.requires_grad)  # a frozen encoder stays frozen

    def forward_features(self, x, masks=None):
        N, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"DINOv2 input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)  # (N, T, D)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(H // self.patch_size, W // self.patch_size)
        if self.register_tokens is not None:  # after the position embedding: registers have none
            x = torch.cat([x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        R = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1: R + 1],
                "x_norm_patchtokens": x_norm[:, R + 1:], "x_prenorm": x, "masks": masks}

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]


def encoder_targets(encoder, images, grid):
    """REPA's alignment targets: uint8 (N, 3, H, W) images -> (N, grid * grid, D) patch tokens.
    REPA's preprocessing: x / 255, ImageNet mean and std, bicubic resize; the size is the one that
    gives the generator's token grid (REPA's 224 for 16 x 16 tokens at 256 px, 448 at 512 px)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    x = F.interpolate(x, size=(grid * encoder.patch_size,) * 2, mode="bicubic")
    return encoder.forward_features(x)["x_norm_patchtokens"]


# ============================================================================= 6. MaskGIT transformer
# Chang et al. 2022 as reproduced by MaskGIT-pytorch v1.0 (Besnier and Chen 2023): a bidirectional
# transformer over the VQ tokens and one class token, output logits tied to the token embedding. The
# extra MLPs around the blocks, the sizes and the initialisation follow v1.0, so its released weights
# load through `maskgit_pytorch_to_ours`; attention is SDPA instead of nn.MultiheadAttention.


class MaskGITBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); dropout on the attention
    probabilities, after the GELU and after the MLP, where v1.0 has it (exact GELU, as v1.0)."""

    def __init__(self, dim, num_heads, mlp_dim, dropout):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # v1.0's in_proj_weight: q, k, v stacked, heads contiguous
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(self.norm1(x)).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (N, heads, T, D/heads)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(N, T, D)
        x = x + self.proj(h)
        h = F.dropout(F.gelu(self.fc1(self.norm2(x))), p, self.training)
        return x + F.dropout(self.fc2(h), p, self.training)


class MaskGIT(nn.Module):
    """forward(z, y): z (N, h, w) token indices in [0, codebook_size], where codebook_size is the
    mask token; y (N,) labels in [0, num_classes], where num_classes is the null class of guidance
    -> (N, h * w, codebook_size) logits over the codebook.

    One embedding table holds the codes, the mask token, the classes and the null class (v1.0's
    layout), and the output logits are x @ (its code rows)^T + a per-position bias.
    """

    def __init__(self, input_size=16, codebook_size=1024, num_classes=1000, hidden_size=768, depth=24, num_heads=16,
                 mlp_dim=3072, dropout=0.1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of the {num_heads} heads")
        self.config = dict(input_size=input_size, codebook_size=codebook_size, num_classes=num_classes,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout)
        self.input_size, self.codebook_size, self.num_classes = input_size, codebook_size, num_classes
        self.num_tokens = input_size * input_size
        self.mask_token = codebook_size
        self.dropout = dropout
        self.tok_emb = nn.Embedding(codebook_size + 1 + num_classes + 1, hidden_size)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.num_tokens + 1, hidden_size))  # the class token is last
        self.in_norm1 = nn.LayerNorm(hidden_size, eps=1e-12)
        self.in_fc1 = nn.Linear(hidden_size, hidden_size)
        self.in_norm2 = nn.LayerNorm(hidden_size, eps=1e-12)
        self.in_fc2 = nn.Linear(hidden_size, hidden_size)
        self.blocks = nn.ModuleList([MaskGITBlock(hidden_size, num_heads, mlp_dim, dropout) for _ in range(depth)])
        self.out_norm1 = nn.LayerNorm(hidden_size, eps=1e-12)
        self.out_fc = nn.Linear(hidden_size, hidden_size)
        self.out_norm2 = nn.LayerNorm(hidden_size, eps=1e-12)
        # v1.0's bias covers every position and every row of the table, (T + 1, codebook + 1 +
        # classes + 1); its forward keeps (T, codebook + 1), the extra column being the mask token's, which
        # our sampler never draws: only the (T, codebook) corner is kept
        self.bias = nn.Parameter(torch.zeros(self.num_tokens, codebook_size))
        self.initialize_weights()

    def initialize_weights(self):
        """v1.0's initialisation: PyTorch's defaults (N(0, 1) embedding, Kaiming-uniform linears),
        nn.MultiheadAttention's xavier-uniform in-projection with zero biases, positions N(0, 0.02)."""
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.qkv.weight)
            nn.init.zeros_(block.qkv.bias)
            nn.init.zeros_(block.proj.bias)

    def forward(self, z, y):
        N = z.shape[0]
        tokens = torch.cat([z.reshape(N, -1), (y + self.codebook_size + 1)[:, None]], 1)  # (N, T + 1)
        x = self.tok_emb(tokens) + self.pos_emb  # (N, T + 1, D)
        p, train = self.dropout, self.training
        x = F.gelu(self.in_fc1(F.dropout(self.in_norm1(x), p, train)))
        x = self.in_fc2(F.dropout(self.in_norm2(x), p, train))
        for block in self.blocks:
            x = block(x)
        x = self.out_norm2(F.gelu(self.out_fc(F.dropout(self.out_norm1(x), p, train))))
        return x[:, :-1] @ self.tok_emb.weight[: self.codebook_size].t() + self.bias  # (N, T, codebook_size)


# Masking schedules. Training masks each token of a sample with probability mask_ratio(r, mode),
# r ~ U(0, 1) per sample; decoding unmasks unmask_schedule(...)[i] tokens at step i. Both are v1.0's
# formulas (its `get_mask_code` and `adap_sche`), whose training and decoding forms differ.
MASK_SCHEDULES = ("arccos", "cosine", "linear", "square")
DECODE_SCHEDULES = MASK_SCHEDULES + ("root",)


def mask_ratio(r, mode="arccos"):
    """Fraction of tokens to mask for r in [0, 1]: arccos (v1.0's default) 2 arccos(r) / pi, cosine
    cos(pi r / 2), linear r, square r^2."""
    if mode == "arccos":
        return torch.arccos(r) / (math.pi / 2)
    if mode == "cosine":
        return torch.cos(r * math.pi / 2)
    if mode == "linear":
        return r
    if mode == "square":
        return r**2
    raise ValueError(f"unknown mask schedule {mode!r}: choose from {', '.join(MASK_SCHEDULES)}")


def unmask_schedule(num_tokens, num_steps, mode="arccos"):
    """Tokens unmasked at each decoding step (v1.0's rule): weights v(r) on r = linspace(1, 0,
    num_steps), scaled to sum to num_tokens and rounded, each step at least 1, the last step taking
    the remainder. v: arccos 2 arccos(r) / pi, cosine cos(pi r / 2), linear 1 - r, square 1 - r^2,
    root 1 - sqrt(r). Raises ValueError when the rule cannot give every step a token."""
    if num_steps == 1:  # v1.0's weights are all 0 there (0 / 0): one step decodes every token
        return [num_tokens]
    r = torch.linspace(1, 0, num_steps)
    weights = {"arccos": lambda: torch.arccos(r) / (math.pi / 2), "cosine": lambda: torch.cos(r * math.pi / 2),
               "linear": lambda: 1 - r, "square": lambda: 1 - r**2, "root": lambda: 1 - r.sqrt()}
    if mode not in weights:
        raise ValueError(f"unknown decoding schedule {mode!r}: choose from {', '.join(DECODE_SCHEDULES)}")
    v = weights[mode]()
    counts = (v / v.sum() * num_tokens).round().clamp(min=1)
    counts[-1] += num_tokens - counts.sum()
    if num_steps > num_tokens or counts[-1] < 1:
        raise ValueError(f"{num_steps} steps cannot each unmask a token of {num_tokens} with the {mode} schedule: "
                         f"use fewer steps")
    return [int(c) for c in counts]


def _uniform(generators, shape, device):
    """(N, *shape) float64 uniforms in [0, 1), row i from generator i alone."""
    return torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in generators]).to(device)


@torch.no_grad()
def maskgit_generate(model, y, generators, num_steps=8, sched_mode="arccos", r_temp=4.5, sm_temp=1.0, cfg_scale=4.0):
    """MaskGIT's confidence-based decoding, as MaskGIT-pytorch v1.0 (its `sample`, randomize="linear").

    Starts from all-mask tokens; at step i (of n) every masked token is sampled from
    softmax(sm_temp * logits) (v1.0 multiplies: sm_temp > 1 sharpens), its confidence is
    log p(token) + r_temp (1 - i / (n - 1)) g with Gumbel noise g, and the unmask_schedule(...)[i]
    most confident masked tokens are fixed for good. Guidance: logits = (1 + w) cond - w uncond with
    w = (cfg_scale - 1) i / (n - 1): v1.0's linear ramp from 0 of its weight w, written with the
    scale of DiT (uncond + cfg_scale (cond - uncond), so v1.0's w = 3 is cfg_scale 4, and 1 disables).
    generators: one torch.Generator per sample; sample i's draws come from generator i alone, so a
    sample does not depend on its batch. Returns (N, h, w) token indices.
    """
    N, T, device = y.shape[0], model.num_tokens, y.device
    z = torch.full((N, T), model.mask_token, dtype=torch.long, device=device)
    masked = torch.ones(N, T, dtype=torch.bool, device=device)
    counts = unmask_schedule(T, num_steps, sched_mode)
    null = torch.full_like(y, model.num_classes)
    for i, k in enumerate(counts):
        ramp = i / (num_steps - 1) if num_steps > 1 else 1.0
        w = (cfg_scale - 1) * ramp
        if w != 0:  # one batch: conditional half, then the null class
            cond, uncond = model(torch.cat([z, z]), torch.cat([y, null])).float().chunk(2)
            logits = (1 + w) * cond - w * uncond
        else:
            logits = model(z, y).float()
        probs = torch.softmax(logits * sm_temp, -1).double()  # (N, T, K)
        # categorical draw by inverting the CDF with one uniform per token
        cdf = probs.cumsum(-1)
        u = _uniform(generators, (T, 1), device) * cdf[..., -1:]
        pred = torch.searchsorted(cdf, u, right=True).clamp(max=model.codebook_size - 1).squeeze(-1)  # (N, T)
        gumbel = -torch.log(-torch.log(_uniform(generators, (T,), device)))
        conf = torch.log(probs.gather(-1, pred[..., None]).squeeze(-1)) + r_temp * (1 - ramp) * gumbel
        conf = conf.masked_fill(~masked, -math.inf)  # fixed tokens are never chosen again
        chosen = torch.zeros_like(masked).scatter_(1, conf.topk(k, dim=1).indices, True)
        z = torch.where(chosen, pred, z)
        masked &= ~chosen
    return z.view(N, model.input_size, model.input_size)


# ============================================================================= 7. checkpoint formats

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
    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    save_file(sd, weights)
    os.chmod(weights, utils.shared_mode())  # safetensors writes 0600: teammates could not load a shared export
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

        try:
            return load_file(path)
        except Exception as e:  # SafetensorError derives from Exception only
            raise RuntimeError(f"{path} is not a readable safetensors file ({e}): a truncated download or a git-lfs "
                               f"pointer? Delete it and get the file again") from None
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
    # LDM's LitEma: SD's "ema-pruned" VAE files keep its two counters; unpruned ones its weights too
    ema = [k for k in sd if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]
    if ema:
        utils.print0(f"note: the file also holds LDM EMA weights ({len(ema)} model_ema.* tensors); the raw weights are loaded")
    sd = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    extras = {k: v for k, v in sd.items() if k.startswith("loss.")}
    if isinstance(obj, dict) and obj.get("optimizer_states"):  # a Lightning .ckpt: [autoencoder Adam, discriminator Adam]
        extras["optimizer_states"] = obj["optimizer_states"]
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
    training-only entries (`loss.*` of an LDM/taming ckpt: discriminator and logvar; a Lightning
    ckpt's `optimizer_states`).
    """
    spec = str(spec)
    extras = {}
    if spec.startswith("scratch:"):
        name = spec.split(":", 1)[1]
        if name not in AE_configs:
            raise ValueError(f"unknown autoencoder config {name!r} in {spec!r}: choose from {sorted(AE_configs)}")
        model = build_autoencoder(AE_configs[name])
        return (model, extras) if return_extras else model
    if spec in PRETRAINED_AUTOENCODERS and not os.path.exists(spec):  # a local copy of that name wins
        spec = fetch_pretrained(spec)  # one process downloads (utils.cache_lock), the others wait for it
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{spec} is a folder without config.json: not a diffusers autoencoder folder")
        try:
            cfg, path = _load_diffusers_folder(spec)
            config = config_from_diffusers(cfg) if cfg.get("_class_name", "AutoencoderKL") == "AutoencoderKL" else None
        except (ValueError, KeyError) as e:  # a truncated or HTML config.json, a missing key
            raise ValueError(f"{os.path.join(spec, 'config.json')} is not a readable diffusers AutoencoderKL config "
                             f"({type(e).__name__}: {e}): delete it and get it again") from None
        if config is None:
            raise ValueError(f"{spec}: diffusers class {cfg['_class_name']} is not supported (AutoencoderKL only)")
        model = build_autoencoder(config)
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
                if config["scaling_factor"] != 1.0:
                    utils.print0(f"note: {spec} carries no latent scale; assuming SD-VAE's {config['scaling_factor']} (an "
                                 f"SDXL-VAE file needs 0.13025: prefer its diffusers folder, or --latent-norm channel)")
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


# --- generators (DiT / SiT) -----------------------------------------------------------------------

GENERATOR_FORMAT = "eqvae-generator"


def build_generator(name, **kwargs):
    """A DiT_models / SiT_models entry by name, e.g. build_generator("DiT-XL/2", input_size=32)."""
    registry = {**DiT_models, **SiT_models}
    if name not in registry:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(registry)}")
    return registry[name](**kwargs)


def released_recipe(name, image_size, vae="sd-vae-ft-ema", repa=False):
    """How the official DiT/SiT/REPA code trains and samples a network of this family: DDPM (DiT)
    or a linear velocity interpolant fed SiT's time (SiT) or REPA's (a SiT with projectors),
    SD-VAE latents times 0.18215."""
    if name.startswith("SiT"):
        objective = dict(kind="transport", path="linear", prediction="velocity", time_input="repa" if repa else "sit")
    else:
        objective = dict(kind="diffusion", num_timesteps=1000)
    return dict(model=name, image_size=image_size, objective=objective, class_names=None,
                latent=dict(vae=vae, vae_hash=None, norm="scale", scale=0.18215, shift=0.0))


def _config_from_generator_state(sd, encoder_depth=8):
    """input_size, in_channels, learn_sigma and num_classes of an official DiT/SiT/REPA state dict,
    and REPA's projector sizes and qk-norm when present (the projectors' depth is not in the
    weights and does not change sampling: REPA's SiT-XL/2 reads block 8, shallower nets their last)."""
    patch = sd["x_embedder.proj.weight"].shape[-1]
    in_channels = sd["x_embedder.proj.weight"].shape[1]
    grid = math.isqrt(sd["pos_embed"].shape[1])
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    config = dict(input_size=grid * patch, in_channels=in_channels, learn_sigma=out == 2 * in_channels, num_classes=rows - 1,
                  qk_norm="blocks.0.attn.q_norm.weight" in sd)
    num_projectors = len({k.split(".")[1] for k in sd if k.startswith("projectors.")})
    if num_projectors:
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        config.update(z_dims=[sd[f"projectors.{i}.4.weight"].shape[0] for i in range(num_projectors)],
                      projector_dim=sd["projectors.0.0.weight"].shape[0], encoder_depth=min(encoder_depth, depth))
    return config


def load_generator(spec, model_name=None, trust_checkpoint=False, use_ema=True):
    """-> (network, recipe). spec: a PRETRAINED_GENERATORS name (downloaded once into the cache),
    a train_dit.py checkpoint (architecture, objective and latent normalisation are stored in it;
    its EMA weights unless use_ema=False), or an official DiT/SiT/REPA `.pt` (bare state dict or
    {"model", "ema", ...}), which needs `model_name` and gets the official recipe (REPA's when the
    weights hold projectors). MaskGIT names, `model_name`s and checkpoints go to load_maskgit (its
    recipe has `tokens` instead of `latent`)."""
    spec = str(spec)
    if spec in PRETRAINED_MASKGIT or model_name in MaskGIT_models:
        return load_maskgit(spec, model_name, trust_checkpoint, use_ema)
    if spec in PRETRAINED_GENERATORS and not os.path.exists(spec):
        entry = PRETRAINED_GENERATORS[spec]
        path = utils.download(entry["url"], os.path.join("generators", entry["filename"]))
        sd = utils.load_checkpoint(path, trust_checkpoint)
        sd = sd.get("ema", sd)
        model_name, recipe = entry["model"], released_recipe(entry["model"], entry["image_size"], repa="repa" in entry)
        model = build_generator(model_name, input_size=entry["image_size"] // 8, num_classes=1000, **entry.get("repa", {}))
    elif os.path.isfile(spec):
        obj = utils.load_checkpoint(spec, trust_checkpoint)
        if isinstance(obj, dict) and "maskgit" in obj:  # a train_maskgit.py checkpoint
            return maskgit_from_checkpoint(obj, spec, model_name, use_ema)
        if isinstance(obj, dict) and "generator" in obj:  # ours: rebuild without being told
            recipe = obj["generator"]
            if model_name and model_name != recipe["model"]:
                raise ValueError(f"{spec} holds a {recipe['model']}, not the --model {model_name} given: pass --model "
                             f"{recipe['model']} (sample.py: or leave --model out)")
            model = DiT(**recipe["config"])
            if use_ema and obj.get("ema") is None:  # a run with --ema-decay 0
                utils.print0(f"note: {spec} kept no EMA: its raw weights are used")
            sd = obj["ema"] if use_ema and obj.get("ema") is not None else obj["model"]
        else:  # official: a bare state dict, or DiT/SiT/REPA training's {"model", "ema", "opt", ...}
            sd = obj
            if isinstance(obj, dict) and ("model" in obj or "ema" in obj):
                sd = obj["ema"] if use_ema and obj.get("ema") is not None else obj.get("model", obj)
            if not isinstance(sd, dict) or "pos_embed" not in sd:
                raise ValueError(f"{spec} is neither a train_dit.py checkpoint nor an official DiT/SiT/REPA state dict "
                                 f"(a MaskGIT-pytorch .pth file needs --model MaskGIT-B)")
            if model_name is None:
                raise ValueError(f"{spec} is an official DiT/SiT/REPA state dict without an architecture: pass --model "
                                 f"(e.g. DiT-XL/2 or SiT-XL/2)")
            config = _config_from_generator_state(sd)
            model = build_generator(model_name, **config)
            recipe = released_recipe(model_name, config["input_size"] * 8, repa="z_dims" in config)
    else:
        raise FileNotFoundError(f"generator {spec!r} is neither a file nor a known name ({', '.join(PRETRAINED_GENERATORS)})")
    _load_strict(model, sd, spec)
    return model, recipe


def load_dinov2(spec, trust_checkpoint=False):
    """A DINOv2 encoder in eval mode: a DINOv2_models name (its released `*_pretrain.pth`, downloaded
    once into the cache; offline, the error names the URL and the path to put it at) or a path to
    such a state dict, whose architecture is read from its shapes."""
    spec = str(spec)
    if spec in DINOv2_models and not os.path.exists(spec):
        path = utils.download(dinov2_url(spec), os.path.join("dinov2", os.path.basename(dinov2_url(spec))))
        model = DINOv2_models[spec]()
    elif os.path.isfile(spec):
        path = spec
    else:
        raise FileNotFoundError(f"encoder {spec!r} is neither a file nor a DINOv2 name ({', '.join(DINOv2_models)})")
    sd = utils.load_checkpoint(path, trust_checkpoint)
    if not isinstance(sd, dict) or "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path} is not a DINOv2 state dict (no cls_token / patch_embed.proj.weight)")
    if spec not in DINOv2_models:
        dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
        registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
        model = DINOv2(embed_dim=dim, depth=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), num_heads=dim // 64,
                       patch_size=patch, img_size=math.isqrt(sd["pos_embed"].shape[1] - 1) * patch,
                       num_register_tokens=registers, ffn="swiglu" if "blocks.0.mlp.w12.weight" in sd else "mlp",
                       interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1)
    _load_strict(model, sd, path)
    return model.eval().requires_grad_(False)


# --- MaskGIT checkpoints (ours and MaskGIT-pytorch v1.0's) ------------------------------------------

# v1.0's module paths -> ours; `{i}` is the block index
_MASKGIT_PYTORCH_NAMES = {
    "first_layer.0": "in_norm1", "first_layer.2": "in_fc1", "first_layer.4": "in_norm2", "first_layer.6": "in_fc2",
    "last_layer.0": "out_norm1", "last_layer.2": "out_fc", "last_layer.4": "out_norm2",
    "transformer.layers.{i}.0.norm": "blocks.{i}.norm1", "transformer.layers.{i}.0.fn.mha.out_proj": "blocks.{i}.proj",
    "transformer.layers.{i}.1.norm": "blocks.{i}.norm2", "transformer.layers.{i}.1.fn.net.0": "blocks.{i}.fc1",
    "transformer.layers.{i}.1.fn.net.3": "blocks.{i}.fc2",
}


def maskgit_pytorch_to_ours(sd, num_classes=1000):
    """A MaskGIT-pytorch v1.0 `MaskTransformer` state dict -> (our MaskGIT state dict, the token
    grid side, codebook size and class count as MaskGIT constructor arguments).

    Names are mapped one to one (nn.MultiheadAttention's in_proj_weight/bias become qkv); the
    output bias keeps the (T, codebook) corner (v1.0's logits also have a mask-token column, dropped
    here on purpose: see MaskGIT.bias). The codebook size is read from
    the embedding table given `num_classes` (the released models: ImageNet's 1000); v1.0 does not
    store the head count, so the width, depth and heads come from a MaskGIT_models entry."""
    ours = {}
    for key, value in sd.items():
        target = {"tok_emb.weight": "tok_emb.weight", "pos_emb": "pos_emb", "bias": "bias"}.get(key)
        if target is None:
            match = re.fullmatch(r"transformer\.layers\.(\d+)\.0\.fn\.mha\.in_proj_(weight|bias)", key)
            if match:
                target = f"blocks.{match[1]}.qkv.{match[2]}"
        if target is None:
            module, _, leaf = key.rpartition(".")
            block = re.match(r"transformer\.layers\.(\d+)\.", module)
            pattern = module.replace(f"layers.{block[1]}.", "layers.{i}.") if block else module
            if pattern in _MASKGIT_PYTORCH_NAMES:
                target = _MASKGIT_PYTORCH_NAMES[pattern].replace("{i}", block[1] if block else "") + "." + leaf
        if target is None:
            raise KeyError(f"{key} is not a MaskGIT-pytorch v1.0 transformer parameter")
        ours[target] = value
    for needed in ("tok_emb.weight", "pos_emb", "bias", "blocks.0.fc1.weight"):
        if needed not in ours:
            raise KeyError(f"not a MaskGIT-pytorch v1.0 transformer state dict: no parameter for {needed}")
    num_tokens = ours["pos_emb"].shape[1] - 1
    codebook = ours["tok_emb.weight"].shape[0] - num_classes - 2
    if math.isqrt(num_tokens) ** 2 != num_tokens or codebook <= 0:
        raise ValueError(f"pos_emb {tuple(ours['pos_emb'].shape)} and tok_emb {tuple(ours['tok_emb.weight'].shape)} "
                         f"fit no square token grid with {num_classes} classes")
    ours["bias"] = ours["bias"][:num_tokens, :codebook]
    return ours, dict(input_size=math.isqrt(num_tokens), codebook_size=codebook, num_classes=num_classes)


def maskgit_recipe(name, config, image_size, vae, vae_hash=None, class_names=None):
    """What sample.py needs besides the weights: the architecture and the VQ model whose tokens it models."""
    return dict(model=name, config=config, image_size=image_size, class_names=class_names,
                tokens=dict(vae=vae, vae_hash=vae_hash, codebook_size=config["codebook_size"]))


def load_maskgit(spec, model_name=None, trust_checkpoint=False, use_ema=True):
    """-> (MaskGIT, recipe). spec: a PRETRAINED_MASKGIT name (downloaded once into the cache), a
    train_maskgit.py checkpoint (its EMA weights unless use_ema=False, or none was kept), or a
    MaskGIT-pytorch v1.0 `.pth` ({"model_state_dict", ...} or a bare state dict), which needs
    `model_name` and decodes with taming's f16 VQGAN (the one v1.0 trained on)."""
    spec = str(spec)
    if spec in PRETRAINED_MASKGIT and not os.path.exists(spec):
        entry = PRETRAINED_MASKGIT[spec]
        path, model_name = utils.download(entry["url"], os.path.join("generators", entry["filename"])), entry["model"]
    elif os.path.isfile(spec):
        path = spec
    else:
        raise FileNotFoundError(f"MaskGIT {spec!r} is neither a file nor a known name ({', '.join(PRETRAINED_MASKGIT)})")
    return maskgit_from_checkpoint(utils.load_checkpoint(path, trust_checkpoint), spec, model_name, use_ema)


def maskgit_from_checkpoint(obj, spec, model_name=None, use_ema=True):
    """load_maskgit's second half, for a checkpoint already read from `spec`."""
    if isinstance(obj, dict) and "maskgit" in obj:  # ours: rebuild without being told
        recipe = obj["maskgit"]
        if model_name and model_name not in MaskGIT_models:
            raise ValueError(f"{spec} is a train_maskgit.py checkpoint ({recipe['model']}), not a DiT/SiT one: "
                             f"sample it with sample.py, or continue it with train_maskgit.py")
        if model_name and model_name != recipe["model"]:
            raise ValueError(f"{spec} holds a {recipe['model']}, not the --model {model_name} given: pass --model "
                             f"{recipe['model']} (sample.py: or leave --model out)")
        if use_ema and obj.get("ema") is None:  # v1.0's recipe keeps no EMA
            utils.print0(f"note: {spec} kept no EMA: its raw weights are used")
        sd = obj["ema"] if use_ema and obj.get("ema") is not None else obj["model"]
        model = MaskGIT(**recipe["config"])
    else:
        sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict) or "tok_emb.weight" not in sd:
            raise ValueError(f"{spec} is neither a train_maskgit.py checkpoint nor a MaskGIT-pytorch state dict")
        if model_name is None:
            raise ValueError(f"{spec} is a MaskGIT-pytorch state dict without an architecture name: pass --model (e.g. MaskGIT-B)")
        sd, grid = maskgit_pytorch_to_ours(sd)
        model = MaskGIT_models[model_name](**grid)
        recipe = maskgit_recipe(model_name, model.config, grid["input_size"] * 16, "vq-f16-1024")
    _load_strict(model, sd, spec)
    return model, recipe


def fetch_pretrained(name):
    """Download a named autoencoder into the cache dir once; returns a local file or folder."""
    entry = PRETRAINED_AUTOENCODERS[name]
    if entry["format"] == "diffusers":
        repo = entry["repo"]
        base = f"https://huggingface.co/{repo}/resolve/main/" + (entry.get("subfolder", "") + "/" if entry.get("subfolder") else "")
        files = ("config.json", "diffusion_pytorch_model.safetensors")
        try:
            return os.path.dirname([utils.download(base + f, os.path.join(name, f)) for f in files][-1])
        except RuntimeError as e:  # offline: both files and both places in one message
            folder = os.path.join(utils.cache_dir(), name)
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            raise RuntimeError(f"{e}\n{name} is a diffusers folder: it needs " + " and ".join(
                f"{base + f} at {os.path.join(folder, f)}" for f in missing)) from None
    if entry["format"] == "ldm-zip":
        ckpt = os.path.join(utils.cache_dir(), name, "model.ckpt")
        if os.path.isfile(ckpt):
            return ckpt
        archive = utils.download(entry["url"], os.path.join(name, os.path.basename(entry["url"])))
        with utils.cache_lock(ckpt):  # one process unpacks; the others find it in place
            if os.path.isfile(ckpt):
                return ckpt
            if not zipfile.is_zipfile(archive):
                raise RuntimeError(f"{archive} is not a zip archive (a broken download?): delete it and retry")
            with zipfile.ZipFile(archive) as z:
                member = next((m for m in z.namelist() if m.endswith(".ckpt")), None)
                if member is None:
                    raise RuntimeError(f"{archive} holds no .ckpt file: delete it and retry")
                fd, tmp = utils.shared_tempfile(os.path.dirname(ckpt), "model.ckpt.part")
                with z.open(member) as src, os.fdopen(fd, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(tmp, ckpt)
        return ckpt
    return utils.download(entry["url"], os.path.join(name, entry["filename"]))


# ============================================================================= 8. registries

# Architectures (LDM configs). `tiny`/`tiny-vq` are for CPU tests, `small` (0.95M parameters) for the demo.
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
    "small": dict(kind="kl", ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=4,
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


# DiT sizes (depth, hidden size, heads) from the DiT paper; T is ours, for CPU tests and the demo.
DIT_SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _generator_constructor(size, patch, family):
    depth, hidden, heads = DIT_SIZES[size]

    def constructor(**kwargs):  # called like the official registries: DiT_models["DiT-XL/2"](input_size=32, ...)
        return DiT(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, family=family, **kwargs)
    return constructor


# patch 1 is not in the official registries; the paper uses DiT-B/1 on 16x16 latents (Table 1)
DiT_models = {f"DiT-{s}/{p}": _generator_constructor(s, p, "dit") for s in DIT_SIZES for p in (1, 2, 4, 8)}
SiT_models = {f"SiT-{s}/{p}": _generator_constructor(s, p, "sit") for s in DIT_SIZES for p in (1, 2, 4, 8)}

# Released generators: the EMA weights as a bare state dict, trained on SD-VAE-FT-EMA latents x 0.18215
# (REPA's: SiT-XL/2 with one projector to DINOv2-B's 768 features after block 8, 4M iterations)
PRETRAINED_GENERATORS = {
    "DiT-XL/2-256": dict(model="DiT-XL/2", image_size=256, filename="DiT-XL-2-256x256.pt",
                         url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"),
    "DiT-XL/2-512": dict(model="DiT-XL/2", image_size=512, filename="DiT-XL-2-512x512.pt",
                         url="https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt"),
    "SiT-XL/2-256": dict(model="SiT-XL/2", image_size=256, filename="SiT-XL-2-256x256.pt",
                         url="https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
                             "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0"),
    "REPA-SiT-XL/2-256": dict(model="SiT-XL/2", image_size=256, filename="REPA-SiT-XL-2-256.pt",
                              url="https://www.dl.dropboxusercontent.com/scl/fi/cxedbs4da5ugjq5wg3zrg/last.pt"
                                  "?rlkey=8otgrdkno0nd89po3dpwngwcc&st=apcc645o&dl=0",
                              repa=dict(z_dims=[768], encoder_depth=8, projector_dim=2048)),
}

# DINOv2 (embed dim, depth, heads, feed-forward) as torch.hub's entries; `_reg` adds 4 registers
# and DINOv2's interpolation settings for them (antialiased, by size).
DINOV2_SIZES = {"s": (384, 12, 6, "mlp"), "b": (768, 12, 12, "mlp"), "l": (1024, 24, 16, "mlp"), "g": (1536, 40, 24, "swiglu")}


def _dinov2_constructor(size, registers):
    dim, depth, heads, ffn = DINOV2_SIZES[size]

    def constructor(**kwargs):
        reg = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0) if registers else {}
        return DINOv2(embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn, **{**reg, **kwargs})
    return constructor


DINOv2_models = {f"dinov2_vit{s}14{'_reg' if r else ''}": _dinov2_constructor(s, r) for r in (False, True) for s in DINOV2_SIZES}


def dinov2_url(name):
    """The released weights of a DINOv2_models entry (dl.fbaipublicfiles.com/dinov2/...)."""
    base = name.removesuffix("_reg")
    return f"https://dl.fbaipublicfiles.com/dinov2/{base}/{base}{'_reg4' if name.endswith('_reg') else ''}_pretrain.pth"


# MaskGIT sizes (hidden size, depth, heads, MLP width). B is MaskGIT-pytorch v1.0's "base", the paper's
# Table 3 model (174.16M parameters in v1.0's count, 0.26M fewer here: see MaskGIT.bias); L and H
# are its "big" and "huge"; S and T are ours, for small runs and CPU tests.
MASKGIT_SIZES = {"T": (128, 4, 4, 512), "S": (384, 12, 6, 1536), "B": (768, 24, 16, 3072), "L": (1024, 32, 16, 3072),
                 "H": (1024, 48, 16, 3072)}


def _maskgit_constructor(size):
    hidden, depth, heads, mlp = MASKGIT_SIZES[size]

    def constructor(**kwargs):  # MaskGIT_models["MaskGIT-B"](input_size=16, codebook_size=1024, num_classes=1000)
        return MaskGIT(hidden_size=hidden, depth=depth, num_heads=heads, mlp_dim=mlp, **kwargs)
    return constructor


MaskGIT_models = {f"MaskGIT-{s}": _maskgit_constructor(s) for s in MASKGIT_SIZES}

# MaskGIT-pytorch v1.0's released ImageNet models (taming's f16 VQGAN, 1024 codes): 256 px (the
# paper's Table 3 baseline, 6.80 FID) and its 512 px fine-tune
PRETRAINED_MASKGIT = {
    f"MaskGIT-B-{px}": dict(model="MaskGIT-B", image_size=px, filename=f"MaskGIT_ImageNet_{px}.pth",
                            url=f"https://huggingface.co/llvictorll/Maskgit-pytorch/resolve/main/pretrained_maskgit/MaskGIT/"
                                f"MaskGIT_ImageNet_{px}.pth")
    for px in (256, 512)
}
