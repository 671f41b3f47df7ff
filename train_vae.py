"""EQ-VAE fine-tuning (or training from scratch) of KL and VQ autoencoders (paper Sec. 3.3).

Each step, with probability --eq-prob the step uses the EQ-VAE objective (Eq. 5): decode the
transformed latent and compare it with the transformed image, L_rec(tau x, D(tau E(x))) + GAN on
D(tau E(x)) + KL of q(z|x); otherwise the standard LDM objective (Eq. 1). That is Eq. 7, in
eq_vae_objective. --recipe paper|official sets what the paper and the official code do differently
(resampling for tau, low-resolution prior preservation, crop, precision).

  CPU smoke:  python train_vae.py --preset tiny
  one GPU:    python train_vae.py --vae kl-f8 --data-path /data/openimages/train --results-dir results
  8 GPUs:     torchrun --nproc_per_node=8 train_vae.py --vae kl-f8 --data-path /data/openimages/train \\
                  --global-batch-size 80 --grad-accum 2 --epochs 5 --export-diffusers results/eq-vae-diffusers
  the demo:   python train_vae.py --preset demo
"""
import argparse
import contextlib
import copy
import math
import multiprocessing
import os
import random
import shutil

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import models
import utils

# ----------------------------------------------------------------------------- the objective


def forward_step(ae, x, tau, interp, antialias):
    """One autoencoder pass. tau=None: Eq. 1 (target x, reconstruction D(E(x))); otherwise Eq. 5
    (target tau x, reconstruction D(tau E(x))). The regulariser is always that of q(z|x): the KL
    of the untransformed posterior (summed over C, H, W, mean over the batch, as LDM), or the VQ
    codebook + commitment loss of the transformed features for discrete models. Also returns E(x),
    the features this pass encoded (before tau), so the explicit term needs no second encoder pass."""
    transform = (lambda h: h) if tau is None else (lambda h: models.apply_eq_transform(h, tau, interp, antialias))
    target = transform(x)
    if utils.unwrap(ae).kind == "kl":
        rec, posterior = ae(x, latent_fn=None if tau is None else transform)
        return target, rec, posterior.kl().mean(), posterior.mean
    encoded = []

    def record_then_transform(h):
        encoded.append(h)
        return transform(h)

    rec, reg, _ = ae(x, latent_fn=record_then_transform)
    return target, rec, reg, encoded[0]


def explicit_loss(ae, x, features, tau, stop_grad, interp, antialias):
    """App. A.1, Eq. 4: ||tau E(x) - E(tau x)||^2 per image, averaged over the batch; optionally
    sg[E(tau x)]. `features` is E(x) from the step's own forward. Normalised as the model's other
    terms, so that lambda weighs it alike: summed over the latent's C, h, w for KL models (LDM sums
    the reconstruction and KL per image), a mean over them for VQ models (taming averages the
    reconstruction, codebook and commitment terms)."""
    core = utils.unwrap(ae)
    tz = models.apply_eq_transform(features, tau, interp, antialias)
    tx = models.apply_eq_transform(x, tau, interp, antialias)
    with torch.set_grad_enabled(torch.is_grad_enabled() and not stop_grad):
        ztx = core.encode_features(tx)
    per_element = (tz.float() - ztx.float()).square().flatten(1)
    return (per_element.sum(1) if core.kind == "kl" else per_element.mean(1)).mean()


def adaptive_gan_weight(nll_loss, g_loss, last_layer, disc_weight, loss_scale=1.0):
    """LDM's balance: ||grad nll|| / (||grad g|| + 1e-4) at the decoder's last conv, clamped to 1e4.
    Under fp16 the gradients are taken of the losses times the loss scale and divided back in
    fp32, so a small GAN gradient does not underflow to 0 (which would clamp the weight to 1e4)."""
    nll_grad = torch.autograd.grad(nll_loss * loss_scale, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * loss_scale, last_layer, retain_graph=True)[0]
    weight = (nll_grad.float().norm() / loss_scale) / (g_grad.float().norm() / loss_scale + 1e-4)
    # a scale too large overflows to inf/inf: weight 0 keeps the loss finite, and the scaler, whose
    # backward overflows alike, skips the step and lowers the scale
    return torch.nan_to_num(weight, nan=0.0).clamp(0.0, 1e4).detach() * disc_weight


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(kind, target, rec, reg, logvar, lpips_net, disc, args, gan_on, last_layer, loss_scale=1.0):
    """LDM's LPIPSWithDiscriminator (KL) or taming's VQLPIPSWithDiscriminator (VQ), generator side.

    KL: nll = sum((|x - x'| + w_p LPIPS) / exp(logvar) + logvar) / N, + kl_weight * KL.
    VQ: nll = mean(|x - x'| + w_p LPIPS), + codebook_weight * VQ loss.
    Both: + adaptive weight * disc_factor * (-mean D(x')) once the discriminator is on.
    """
    rec_loss = (target.float() - rec.float()).abs()  # fp32 sums: under fp16, sum |x - x'| over pixels overflows
    terms = {"l1": rec_loss.mean().detach()}
    if args.perceptual_weight > 0:
        p_loss = lpips_net(target, rec)  # (N, 1, 1, 1), broadcast over pixels as in LDM
        rec_loss = rec_loss + args.perceptual_weight * p_loss.float()
        terms["lpips"] = p_loss.mean().detach()
    if kind == "kl":
        nll = (rec_loss / torch.exp(logvar) + logvar).sum() / rec_loss.shape[0]
        loss = nll + args.kl_weight * reg
        terms["kl"] = reg.detach()
    else:
        nll = rec_loss.mean()
        loss = nll + args.codebook_weight * reg
        terms["vq"] = reg.detach()
    terms["nll"] = nll.detach()
    if gan_on:
        g_loss = -disc(rec).float().mean()
        d_weight = adaptive_gan_weight(nll, g_loss, last_layer, args.disc_weight, loss_scale)
        loss = loss + d_weight * args.disc_factor * g_loss
        terms["g"], terms["d_weight"] = g_loss.detach(), d_weight
    return loss, terms


def sample_step_kind(rng, step, args):
    """Eq. 7: 'eq' with probability --eq-prob (implicit mode, from --eq-start on), else 'lowres' with
    probability --lowres-prob (the official code's prior preservation at low resolution), else
    'standard'. The explicit ablation has no EQ branch: its term joins every step (App. A.1)."""
    if args.eq_mode == "implicit" and step >= args.eq_start and rng.random() < args.eq_prob:
        return "eq"
    if rng.random() < args.lowres_prob:
        return "lowres"
    return "standard"


def lowres_input(x, lat, rng, args):
    """Official-code prior preservation: downscale the image by a random factor from the scale
    grid and reconstruct it at that size (not in the paper)."""
    tau = models.sample_eq_transform(lat[0], lat[1], "scale", scales=args.eq_scales, rng=rng)
    return models.apply_eq_transform(x, tau, args.interp, args.antialias)


def latent_size(ae, x):
    """(h, w) of x's latent; taken from each batch, since --crop none may give non-square images."""
    f = utils.unwrap(ae).downsample_factor
    return x.shape[-2] // f, x.shape[-1] // f


def eq_vae_objective(ae, disc, x, step, rng, args, logvar, lpips_net, loss_scale=1.0):
    """Eq. 7 for one micro-batch: the branch, tau, the forward pass and every loss term. Called by the
    training loop and by bench.py. ae and disc may be DDP-wrapped; run it under autocast.

    Returns (autoencoder loss, discriminator loss or None, detached terms to log, branch)."""
    core = utils.unwrap(ae)
    lat = latent_size(ae, x)
    # the branch of Eq. 7, then tau = S(s_x, s_y) R(theta) of Eq. 6 for an EQ step
    kind = sample_step_kind(rng, step, args)
    tau = None
    if kind == "eq":
        tau = models.sample_eq_transform(*lat, args.eq_transform, args.eq_angles, args.eq_scales, rng)
    elif kind == "lowres":
        x = lowres_input(x, lat, rng, args)
    # Eq. 5 (Eq. 1 when tau is None): L_rec(tau x, D(tau E(x))) + lambda_gan L_gan + lambda_reg L_reg;
    # the generator sees the discriminator without DDP and without its gradients
    target, rec, reg, features = forward_step(ae, x, tau, args.interp, args.antialias)
    gan_on = args.disc_weight > 0 and step >= args.disc_start
    critic = utils.unwrap(disc).requires_grad_(False)
    loss, terms = generator_loss(core.kind, target, rec, reg, logvar, lpips_net, critic, args, gan_on,
                                 core.last_layer(), loss_scale)
    critic.requires_grad_(True)
    # App. A.1: L_VAE + lambda L_explicit on every step (from --eq-start), a fresh tau each time
    if args.eq_mode != "implicit":
        explicit = torch.zeros((), device=x.device)  # every rank logs the same keys (one all-reduce)
        if step >= args.eq_start:
            tau_e = models.sample_eq_transform(*latent_size(ae, x), args.eq_transform, args.eq_angles, args.eq_scales, rng)
            explicit = explicit_loss(ae, x, features, tau_e, args.eq_mode == "explicit-sg", args.interp, args.antialias)
            loss = loss + args.explicit_weight * explicit
        terms["explicit"] = explicit.detach()
    # the discriminator judges the same reconstruction (one autoencoder forward serves both updates)
    d_loss = None
    if gan_on:
        d_loss = args.disc_factor * hinge_d_loss(disc(target.detach()), disc(rec.detach()))
        terms["d"] = d_loss.detach()
    terms["loss"] = loss.detach()
    return loss, d_loss, terms, kind


def decayed_lr(lr, step, max_steps, decay_steps):
    """lr for this step: constant (the paper), or falling linearly to zero over the last
    --lr-decay-steps steps, so that a short run ends on settled weights rather than one noisy step."""
    if decay_steps <= 0:
        return lr
    return lr * min(1.0, (max_steps - step) / decay_steps)


def build_optimizers(ae, disc, lr):
    """Adam(0.5, 0.9) for the autoencoder and the discriminator, as LDM. LDM's logvar is a parameter
    of its loss module that configure_optimizers never hands to Adam: it stays fixed, here too."""
    return (torch.optim.Adam(ae.parameters(), lr=lr, betas=(0.5, 0.9)),
            torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)))


# ----------------------------------------------------------------------------- helpers


@torch.no_grad()
def evaluate_batch(ae, x, args):
    """Rotation and scale equivariance error (App. C.3) and PSNR on a fixed held-out batch."""
    ae.eval()
    lat = x.shape[-2] // ae.downsample_factor, x.shape[-1] // ae.downsample_factor
    rot = models.equivariance_error(ae, x, models.eval_transforms(*lat, "rotation"), args.interp, args.antialias)
    scale = models.equivariance_error(ae, x, models.eval_transforms(*lat, "scale"), args.interp, args.antialias)
    rec = reconstruct(ae, x)
    ae.train()
    return {"eq_err_rot": rot.mean().item(), "eq_err_scale": scale.mean().item(), "psnr": models.psnr(x, rec).mean().item()}


def reconstruct(ae, x, latent_fn=None):
    """Deterministic reconstruction D(latent_fn(E(x))): posterior mean (KL) or quantized features (VQ)."""
    h = ae.encode_features(x)
    return ae.decode_features(h if latent_fn is None else latent_fn(h))


@torch.no_grad()
def save_figure2(named_models, x, path, args, scale=0.5, k=0):
    """Figure 2 layout, labelled columns x | D(E(x)) | tau x | D(E(tau x)) | D(tau E(x)); for each
    image one row per model of `named_models` ({row label: autoencoder}), labelled with its name.
    Smaller images are padded to the input size so the grid is rectangular."""
    H, W = x.shape[-2:]
    rows = []
    for ae in named_models.values():
        ae.eval()
        lat = x.shape[-2] // ae.downsample_factor, x.shape[-1] // ae.downsample_factor
        tau = models.eq_transform(*lat, k=k, scale=scale)
        fn = lambda v: models.apply_eq_transform(v, tau, args.interp, args.antialias)
        columns = [x, reconstruct(ae, x), fn(x), reconstruct(ae, fn(x)), reconstruct(ae, x, latent_fn=fn)]
        rows.append([(F.pad(c, (0, W - c.shape[-1], 0, H - c.shape[-2]), value=1.0).clamp(-1, 1) + 1) / 2 for c in columns])
        ae.train()
    # (N x models) rows, image-major: each image's models sit next to each other
    columns = [torch.stack([r[j] for r in rows], 1).flatten(0, 1) for j in range(5)]
    what = f"scale {scale:g}" if k == 0 else f"rot {90 * k}" + (f", scale {scale:g}" if scale != 1 else "")
    labels = ["x", "D(E(x))", f"tau x\n{what}", "D(E(tau x))", "D(tau E(x))"]
    utils.save_labelled_grid(columns, labels, path, row_labels=list(named_models) * len(x))  # small images enlarged


def held_out_batch(args, dataset):
    """Fixed evaluation images (ADM center crop): --val-data-path, or a builtin:shapes seed the
    training set does not use, or else the first images of the training folder."""
    if args.val_data_path:
        dataset = data.make_dataset(args.val_data_path, args.image_size, crop="adm")
    elif args.data_path.startswith("builtin:"):
        name, _, seed = data.parse_builtin(args.data_path)
        dataset = data.make_dataset(f"builtin:{name}:{args.num_eval_images}:{10_000 + seed}", args.image_size)
    else:
        paths = [p for p, _ in dataset.samples[: args.num_eval_images]]
        return torch.stack([data.preprocess(data.load_rgb(p), args.image_size, crop="adm") for p in paths])
    return torch.stack([dataset[i][0] for i in range(min(args.num_eval_images, len(dataset)))])


def given_flags(args, names):
    """The command-line spellings of those of `names` (argparse dests) given explicitly."""
    return [f"--{name.replace('_', '-')}" for name in names if name in args.cli_flags]


def check_args(args, world_size):
    """Bad input fails here, before any model is built or any file written."""
    if args.data_path is None:
        utils.fail("--data-path is required: an image folder or builtin:shapes (or use --preset tiny/demo)")
    if not args.data_path.startswith("builtin:") and not os.path.isdir(args.data_path):
        utils.fail(f"--data-path {args.data_path} does not exist or is not a folder")
    for flag in ("data_path", "val_data_path"):
        if (getattr(args, flag) or "").startswith("builtin:"):
            try:
                data.parse_builtin(getattr(args, flag))
            except ValueError as e:
                utils.fail(f"--{flag.replace('_', '-')}: {e}")
    if args.val_data_path and not args.val_data_path.startswith("builtin:") and not os.path.isdir(args.val_data_path):
        utils.fail(f"--val-data-path {args.val_data_path} does not exist or is not a folder")
    if args.global_batch_size % world_size:
        utils.fail(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} processes")
    if not 0 <= args.eq_prob <= 1 or not 0 <= args.lowres_prob <= 1:
        utils.fail("--eq-prob and --lowres-prob are probabilities in [0, 1]")
    if not 0 < args.min_crop_frac <= 1:
        utils.fail(f"--min-crop-frac {args.min_crop_frac} is out of range: the crop side is min_side x U(frac, 1), frac in (0, 1]")
    if args.eq_mode != "implicit" and "eq_prob" in args.cli_flags:
        utils.fail(f"--eq-prob applies to --eq-mode implicit only: the {args.eq_mode} loss joins every step (App. A.1); "
                   f"remove --eq-prob")
    if args.eq_mode == "implicit" and "explicit_weight" in args.cli_flags:
        utils.fail("--explicit-weight weighs the App. A.1 term of --eq-mode explicit|explicit-sg: add one, or remove it")
    if args.eq_transform in ("scale", "anisotropic") and "eq_angles" in args.cli_flags:
        utils.fail(f"--eq-angles has no effect with --eq-transform {args.eq_transform} (no rotation): remove one of them")
    demo_flags = given_flags(args, DEMO_FLAGS)
    if demo_flags and args.preset != "demo":
        utils.fail(f"{', '.join(demo_flags)}: for --preset demo only; add it, or remove them")
    if "restore_optimizer" in args.cli_flags and args.resume:
        utils.fail("--restore-optimizer restores the starting --vae checkpoint's Adam; --resume restores its own: remove it")
    utils.check_ranges(args, rates=("lr", "base_lr", "demo_base_lr", "perceptual_weight", "kl_weight", "codebook_weight",
                                    "disc_weight", "disc_factor", "explicit_weight", "max_grad_norm"),
                       below_one=("ema_decay",),
                       counts=("global_batch_size", "grad_accum", "epochs", "max_steps", "log_every", "ckpt_every",
                               "eval_every", "num_eval_images", "num_demo_eval", "demo_base_steps", "image_size",
                               "disc_channels"),
                       zero_or_more=("num_workers", "disc_layers"))
    if args.logvar is not None and not math.isfinite(args.logvar):
        utils.fail(f"--logvar {args.logvar} is not a number")
    if args.eq_scales and not all(0 < s <= 1 for s in args.eq_scales):  # also refuses nan and inf
        utils.fail(f"--eq-scales {','.join(map(str, args.eq_scales))}: each scale must lie in (0, 1], as s in [0.25, 1) of Sec. 3.3")
    if args.lr_decay_steps < 0:
        utils.fail(f"--lr-decay-steps {args.lr_decay_steps} is out of range: give 0 (constant lr) or a number of steps")
    if args.export_diffusers and os.path.exists(args.export_diffusers) and os.listdir(args.export_diffusers):
        utils.fail(f"--export-diffusers {args.export_diffusers} exists and is not empty: choose a new folder")


KIND_ONLY_FLAGS = {"kl": ("kl_weight", "logvar"), "vq": ("codebook_weight",)}


def image_shape(args, dataset, factor):
    """(width, height) of the training images: --image-size, or with --crop none the images' own size,
    which must be one size for all (they are stacked into batches) and a multiple of the factor."""
    width = height = args.image_size
    sizes = getattr(dataset, "sizes", None)
    if args.crop == "none" and sizes:  # a folder (builtin:shapes draws --image-size)
        other = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
        if other is not None:
            utils.fail(f"--crop none stacks whole images into batches, so they must share one size: "
                       f"{dataset.samples[0][0]} is {'x'.join(map(str, sizes[0]))}, {dataset.samples[other][0]} is "
                       f"{'x'.join(map(str, sizes[other]))}; use --crop random or adm")
        width, height = sizes[0]
    if width % factor or height % factor:
        what = f"--image-size {args.image_size}" if (width, height) == (args.image_size,) * 2 else f"the images' size {width}x{height}"
        utils.fail(f"{what} is not a multiple of the autoencoder's downsampling factor {factor}")
    return width, height


def check_kind_flags(args, kind):
    """A flag for the other kind of autoencoder (e.g. --kl-weight on a VQ model) is an error."""
    other = "vq" if kind == "kl" else "kl"
    given = [f"--{f.replace('_', '-')}" for f in KIND_ONLY_FLAGS[other] if getattr(args, f) is not None]
    if given:
        utils.fail(f"{args.vae} is a {kind.upper()} autoencoder but {', '.join(given)} only apply to "
                   f"{other.upper()} models: remove them")
    if kind == "vq" and args.export_diffusers:
        utils.fail("--export-diffusers writes diffusers' AutoencoderKL: it does not apply to VQ models")


def resolve_kind_defaults(args, kind):
    """Per-kind defaults: LDM kl-f8 (KL weight 1e-6, GAN weight 0.5) and taming f16 (codebook 1.0, GAN 0.8)."""
    if kind == "kl":
        args.kl_weight = 1e-6 if args.kl_weight is None else args.kl_weight
    else:
        args.codebook_weight = 1.0 if args.codebook_weight is None else args.codebook_weight
    if args.disc_weight is None:
        args.disc_weight = 0.5 if kind == "kl" else 0.8


def restore_adam(opt, state, what):
    """Load a Lightning optimizer state (LDM's Adam: autoencoder params in encoder, decoder,
    quant_conv, post_quant_conv order, as ours) after checking every moment's shape."""
    params = [p for group in opt.param_groups for p in group["params"]]
    stored = sum(len(group["params"]) for group in state["param_groups"])
    bad = [i for i, p in enumerate(params) if "exp_avg" in state["state"].get(i, {}) and state["state"][i]["exp_avg"].shape != p.shape]
    if stored != len(params) or bad:
        utils.fail(f"--restore-optimizer: the {what} optimizer state holds {stored} parameters"
                   + (f" with other shapes (first: #{bad[0]})" if bad else "") + f" for {len(params)} here: "
                   f"the checkpoint's model differs; drop --restore-optimizer")
    opt.load_state_dict(state)


# ----------------------------------------------------------------------------- main

# --resume keeps these (the discriminator's shape is part of the saved state)
FIXED_ON_RESUME = ("vae", "disc_channels", "disc_layers")
# the objective and data: a change on --resume is refused unless --allow-changed-flags
OBJECTIVE_FLAGS = ("recipe", "eq_mode", "eq_prob", "eq_start", "eq_transform", "eq_angles", "eq_scales", "interp",
                   "antialias", "lowres_prob", "explicit_weight", "perceptual_weight", "kl_weight", "logvar",
                   "codebook_weight", "disc_weight", "disc_start", "disc_factor", "data_path", "image_size", "crop",
                   "min_crop_frac", "flip",
                   "global_batch_size", "grad_accum")  # another batch would skip or repeat images of the current epoch


def main(args):
    rank, world_size, device = utils.setup_distributed()
    # --resume: flags not given now take the run's values (a changed objective flag is refused)
    resume_path, resume_ckpt = (utils.resume_args(args, FIXED_ON_RESUME, OBJECTIVE_FLAGS, args.allow_changed_flags)
                                if args.resume else (None, None))
    check_args(args, world_size)
    utils.check_output_folders(args)  # a new run into a folder with checkpoints is refused
    utils.seed_everything(args.global_seed)  # identical initial weights (scratch models, discriminator) on every rank
    precision, autocast = utils.precision_setup(args.precision, device)

    # models first, so a bad checkpoint or data path fails before anything is written. A resumed
    # run rebuilds the architecture from its checkpoint; otherwise --vae gives the starting weights.
    notes = []
    try:
        if resume_ckpt is not None:
            ae, extras = models.build_autoencoder(resume_ckpt["autoencoder_config"]), {}
            changed = utils.changed_flags(args, resume_ckpt["args"], OBJECTIVE_FLAGS)
            if changed:
                notes.append(f"--allow-changed-flags: continuing with {', '.join(changed)}")
        else:
            ae, extras = models.load_autoencoder(args.vae, args.trust_checkpoint, return_extras=True)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        utils.fail(f"{'--resume ' + resume_path if resume_path else '--vae ' + args.vae}: {str(e).strip(chr(34) + chr(39))}")
    kind = ae.kind
    check_kind_flags(args, kind)
    resolve_kind_defaults(args, kind)
    disc = models.NLayerDiscriminator(ndf=args.disc_channels, n_layers=args.disc_layers)
    disc_state = {k[len("loss.discriminator."):]: v for k, v in extras.items() if k.startswith("loss.discriminator.")}
    if disc_state:
        try:
            disc.load_state_dict(disc_state, strict=True)
        except RuntimeError as e:
            utils.fail(f"the discriminator in {args.vae} does not match --disc-channels/--disc-layers: {e}")
        notes.append(f"restored the pretrained discriminator from {args.vae}")
    elif resume_ckpt is None and args.disc_weight > 0:
        notes.append(f"{args.vae} carries no discriminator: training a fresh one (on from step {args.disc_start})")
    # a Lightning .ckpt keeps its Adam states; the official run starts from LDM's kl-f8 through
    # resume_from_checkpoint, which restores them with their lr
    optimizer_states = extras.get("optimizer_states")
    if args.restore_optimizer and resume_ckpt is None and not optimizer_states:
        utils.fail(f"--restore-optimizer: {args.vae} carries no optimizer_states (only a Lightning .ckpt does): remove it")
    # LDM's log-variance: a parameter of its loss that its optimizer never receives, so it stays fixed
    if args.logvar is not None:
        logvar = torch.tensor(args.logvar, device=device)
    else:
        logvar = torch.tensor(float(extras.get("loss.logvar", 0.0)), device=device)
        if "loss.logvar" in extras:
            notes.append(f"restored the pretrained logvar {logvar.item():.4f}")
    try:
        dataset = data.make_dataset(args.data_path, args.image_size, crop=args.crop, flip=args.flip, class_folders=False,
                                    min_size=args.image_size if args.crop != "none" else None, seed=args.global_seed,
                                    min_crop_frac=args.min_crop_frac)
    except (OSError, ValueError, RuntimeError) as e:
        utils.fail(str(e))
    width, height = image_shape(args, dataset, ae.downsample_factor)
    try:
        eval_x = held_out_batch(args, dataset)
    except (OSError, ValueError, RuntimeError) as e:
        utils.fail(str(e))
    if getattr(dataset, "small", None):  # as the official pipeline, which resizes every crop to the target
        notes.append(f"{len(dataset.small)} image(s) under {args.data_path} have a short side below "
                     f"{args.image_size}px (first: {dataset.small[0]}): their crops are enlarged")
    # the smallest image the discriminator and LPIPS see: a downscaled one when EQ steps scale (the
    # explicit term's tau x only meets the encoder) or the low-resolution prior preservation runs
    lat = min(width, height) // ae.downsample_factor
    scaled = args.lowres_prob > 0 or (args.eq_mode == "implicit" and args.eq_prob > 0 and args.eq_transform != "rotation")
    smallest_side = lat
    if scaled:
        smallest_side = models.eq_transform(lat, lat, scale=min(args.eq_scales)).new_h if args.eq_scales else min(models.scale_grid(lat))
    smallest = smallest_side * ae.downsample_factor
    try:  # shape inference on the meta device: does the PatchGAN fit the smallest image it is shown?
        with torch.device("meta"):
            models.NLayerDiscriminator(ndf=1, n_layers=args.disc_layers).eval()(torch.zeros(1, 3, smallest, smallest))
    except RuntimeError:
        if args.disc_weight > 0:
            utils.fail(f"the {args.disc_layers}-layer discriminator cannot see the smallest image it is shown "
                       f"({smallest}px): use larger images or a smaller --disc-layers")
    if args.perceptual_weight > 0 and smallest < 16:  # VGG's four max-pools leave nothing of a smaller image
        utils.fail(f"LPIPS-VGG needs images of 16px or more, and the smallest image it is shown is {smallest}px: use "
                   f"larger images (or --eq-scales), or --perceptual-weight 0")
    lpips_net = models.load_lpips(args.lpips_random).to(device) if args.perceptual_weight > 0 else None
    if args.lpips_random and lpips_net is not None:
        notes.append("LPIPS uses a RANDOM VGG backbone (--lpips-random): its values are not comparable to anything")

    # run folder: a resumed run continues in its own folder
    run_name = f"{os.path.basename(str(args.vae).rstrip('/'))}-{args.eq_mode}"
    run_dir, logger, ckpt_dir = utils.open_run(args, resume_path, run_name, world_size, device, precision,
                                               [recipe_line(args), *notes])
    ae.to(device).train()
    disc.to(device).train()
    ema = copy.deepcopy(ae).requires_grad_(False).eval() if args.ema_decay > 0 else None
    logger.info(f"autoencoder {args.vae} ({kind}, {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M params, "
                f"f={ae.downsample_factor}); discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M params")

    # optimizers: Adam(0.5, 0.9) as LDM; lr = base_lr x effective global batch unless --lr
    effective_batch = args.global_batch_size * args.grad_accum
    lr = args.lr if args.lr is not None else args.base_lr * effective_batch
    opt_ae, opt_disc = build_optimizers(ae, disc, lr)
    if optimizer_states:
        stored_lr = optimizer_states[0]["param_groups"][0]["lr"]
        if args.restore_optimizer:
            restore_adam(opt_ae, optimizer_states[0], "autoencoder")
            if disc_state and len(optimizer_states) > 1:
                restore_adam(opt_disc, optimizer_states[1], "discriminator")
            if "lr" not in args.cli_flags and "base_lr" not in args.cli_flags:
                lr = args.lr = stored_lr  # saved in args: a --resume of this run keeps it
            logger.info(f"--restore-optimizer: Adam moments from {args.vae} (its lr {stored_lr:.3g}; this run: {lr:.3g})")
        else:
            logger.info(f"{args.vae} carries optimizer_states at lr {stored_lr:.3g}; this run starts a fresh Adam at "
                        f"lr {lr:.3g} (the official run continues them: --restore-optimizer)")
    scaler_ae = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scaler_disc = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    logger.info(f"lr {lr:.3g} (effective batch {effective_batch} = {args.global_batch_size} x {args.grad_accum} accumulation)")

    # data: each rank reads its shard of one seeded permutation per epoch
    per_rank, steps_per_epoch, max_steps = utils.epoch_plan(len(dataset), f"--data-path {args.data_path}", args.global_batch_size,
                                                            world_size, args.max_steps, args.epochs, args.grad_accum)
    eval_x = eval_x.to(device)
    logger.info(f"{len(dataset)} images, {steps_per_epoch} steps per epoch, {max_steps} steps")

    # resume: weights, optimizers, step, every rank's RNG streams (the branch and tau draws too)
    step = 0
    rng = random.Random(args.global_seed * 7919 + rank)  # branch and tau draws of this rank
    utils.seed_everything(args.global_seed * world_size + rank)
    disc_received = bool(disc_state)  # from the starting weights: kept in autoencoder.pt even when unused here
    if resume_ckpt is not None:
        disc.load_state_dict(resume_ckpt["discriminator"])
        disc_received = resume_ckpt.get("disc_received", True)
        opt_disc.load_state_dict(resume_ckpt["opt_disc"])
        if scaler_disc.is_enabled() and resume_ckpt["scaler_disc"]:
            scaler_disc.load_state_dict(resume_ckpt["scaler_disc"])
        if resume_ckpt.get("logvar") is not None and args.logvar is None:
            logvar = resume_ckpt["logvar"].to(device)
        step = utils.restore_training(resume_ckpt, ae, ema, opt_ae, scaler_ae, rank, world_size, args.global_seed, logger)
        if len(resume_ckpt["rng"]) == world_size:
            rng.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in resume_ckpt["rng"][rank]["step_rng"]))
        else:
            rng.seed(args.global_seed * 7919 + rank + 1_000_003 * step)
        logger.info(f"resumed from {resume_path} at step {step}")
    if world_size > 1:
        ae_ddp = DDP(ae, device_ids=[device.index] if device.type == "cuda" else None)
        disc_ddp = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ae_ddp, disc_ddp = ae, disc

    def save():
        utils.save_step({
            "model": ae.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "discriminator": disc.state_dict(), "logvar": logvar.detach().cpu() if kind == "kl" else None,
            "opt": opt_ae.state_dict(), "opt_disc": opt_disc.state_dict(),
            "scaler": scaler_ae.state_dict(), "scaler_disc": scaler_disc.state_dict(),
            "step": step, "epoch": step // steps_per_epoch, "args": vars(args),
            "autoencoder_config": dict(ae.config), "disc_received": disc_received,
        }, ckpt_dir, step, dict(utils.rng_state(), step_rng=rng.getstate()))

    # training loop; SIGTERM/SIGINT finish the current step, save and exit cleanly
    stop = utils.StopSignal()
    log = utils.IntervalLog(logger, args.log_every, max_steps, effective_batch, device)
    try:
        while step < max_steps:
            # the rest of this epoch in micro-batches: a step is --grad-accum of them
            batches = iter(data.epoch_loader(dataset, step * args.grad_accum, steps_per_epoch * args.grad_accum, per_rank,
                                             args.global_seed, rank, world_size, args.num_workers,
                                             pin_memory=device.type == "cuda"))
            for _ in range(step % steps_per_epoch, steps_per_epoch):
                if step >= max_steps:
                    break
                opt_ae.zero_grad(set_to_none=True)
                opt_disc.zero_grad(set_to_none=True)
                step_lr = decayed_lr(lr, step, max_steps, args.lr_decay_steps)
                for group in opt_ae.param_groups + opt_disc.param_groups:
                    group["lr"] = step_lr  # the command line's lr wins over a resumed checkpoint's
                loss_scale = scaler_ae.get_scale() if scaler_ae.is_enabled() else 1.0
                step_terms = {}
                for micro in range(args.grad_accum):
                    x = next(batches)[0].to(device, non_blocking=True)
                    # DDP all-reduces gradients on the last micro-batch only
                    with contextlib.ExitStack() as accumulate:
                        if world_size > 1 and micro < args.grad_accum - 1:
                            accumulate.enter_context(ae_ddp.no_sync())
                            accumulate.enter_context(disc_ddp.no_sync())
                        with torch.autocast(**autocast):
                            loss, d_loss, terms, kind_drawn = eq_vae_objective(ae_ddp, disc_ddp, x, step, rng, args, logvar,
                                                                               lpips_net, loss_scale)
                        scaler_ae.scale(loss / args.grad_accum).backward()
                        if d_loss is not None:
                            scaler_disc.scale(d_loss / args.grad_accum).backward()
                    for k, v in terms.items():
                        step_terms[k] = step_terms.get(k, 0.0) + v.float() / args.grad_accum
                    step_terms["eq_steps"] = step_terms.get("eq_steps", 0.0) + float(kind_drawn == "eq") / args.grad_accum
                gan_on = "d" in step_terms
                scaler_ae.unscale_(opt_ae)
                grad_norm = torch.nn.utils.clip_grad_norm_(ae.parameters(), args.max_grad_norm or float("inf"))
                checks = [step_terms["loss"], grad_norm]
                if gan_on:
                    scaler_disc.unscale_(opt_disc)
                    disc_grad_norm = torch.nn.utils.clip_grad_norm_(disc.parameters(), float("inf"))
                    checks += [step_terms["d"], disc_grad_norm]
                    step_terms["disc_grad_norm"] = disc_grad_norm.float()
                if scaler_ae.is_enabled():  # fp16: an inf gradient is the scaler's cue to skip and lower the scale
                    checks = [step_terms["loss"]] + ([step_terms["d"]] if gan_on else [])
                # NaN/inf check and stop request in one small all-reduce per step (the step's only host
                # sync): under bf16/fp32 no scaler skips a NaN gradient, so a bad step is never applied
                nonfinite, stop_now = utils.step_flags(checks, stop.requested, device)
                if nonfinite:
                    utils.stop_nonfinite(logger, step, ckpt_dir, "Lower the lr or use --precision fp32",
                                         what="loss or gradient norm")
                scaler_ae.step(opt_ae)
                scaler_ae.update()
                if utils.scale_collapsed(scaler_ae):
                    utils.stop_nonfinite(logger, step, ckpt_dir, "Use --precision bf16 or fp32", what="gradient norm "
                                         "(every fp16 step skipped: the loss scale fell below 1)")
                if gan_on:
                    scaler_disc.step(opt_disc)
                    scaler_disc.update()
                if ema is not None:
                    utils.update_ema(ema, ae, args.ema_decay)
                step += 1
                log.add(step, step_lr, dict(step_terms, grad_norm=grad_norm))
                if utils.due(step, args.eval_every, max_steps):
                    target_model = ema if ema is not None else ae
                    if rank == 0:
                        metrics = evaluate_batch(target_model, eval_x, args)
                        logger.info("eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                        logger.metrics(step, {f"eval/{k}": v for k, v in metrics.items()})
                        save_figure2({f"step {step}": target_model}, eval_x[:4],
                                     os.path.join(run_dir, f"figure2-{step:07d}.png"), args)
                    utils.barrier()
                if utils.due(step, args.ckpt_every, max_steps) or stop_now:
                    save()
                # a clean exit, which also ends --preset demo; on the last step the final weights are written
                if stop_now and step < max_steps:
                    utils.exit_on_stop(logger, ckpt_dir, step, f"{ckpt_dir}/latest.pt")

        # final weights in our format (EMA when used), plus the diffusers export
        final = ema if ema is not None else ae
        if rank == 0:
            # a discriminator this run neither trained nor received is random weights: left out
            extras = ({f"loss.discriminator.{k}": v.cpu() for k, v in disc.state_dict().items()}
                      if args.disc_weight > 0 or disc_received else {})
            if kind == "kl":
                extras["loss.logvar"] = logvar.detach().cpu()
            models.save_autoencoder(final, os.path.join(run_dir, "autoencoder.pt"), extras=extras)
            if args.export_diffusers:
                models.export_diffusers(final, args.export_diffusers)
                logger.info(f"exported diffusers folder {args.export_diffusers}")
            logger.info(f"done: {run_dir}/autoencoder.pt")
    finally:
        logger.close()
        stop.close()
        utils.cleanup()
    return run_dir


# ----------------------------------------------------------------------------- the demo


def run_branch(branch, threads):
    """One demo branch in its own process (the target of run_demo's workers)."""
    torch.set_num_threads(threads)
    main(argparse.Namespace(**branch))


def demo_stages(args, results_dir):
    """The demo's runs as main() arguments: the base's (None for a given --demo-base file) and the
    two branches', which fine-tune the base's weights."""
    # the stages are runs of their own (no --demo-* flags); an explicit-objective EQ branch may
    # carry --explicit-weight, the implicit stages must not
    own_flags = set(args.cli_flags) - set(DEMO_FLAGS)
    implicit_flags, eq_flags = sorted(own_flags - {"explicit_weight"}), sorted(own_flags)
    stage = dict(vars(args), preset=None, results_dir=results_dir, eq_mode="implicit", eq_prob=0.0, cli_flags=implicit_flags,
                 export_diffusers=None)
    base, base_path = None, args.demo_base
    if args.demo_base == "train":
        base = dict(stage, max_steps=args.demo_base_steps or args.max_steps, lowres_prob=0.0,
                    lr=args.lr if args.demo_base_lr is None else args.demo_base_lr,
                    run_dir=os.path.join(results_dir, "base"))
        base_path = os.path.join(base["run_dir"], "autoencoder.pt")
    branches = {}
    for name, eq_mode, eq_prob, flags in (("control", "implicit", 0.0, implicit_flags),
                                          ("eq-vae", args.eq_mode, args.eq_prob, eq_flags)):
        branches[name] = dict(stage, vae=base_path, eq_mode=eq_mode, eq_prob=eq_prob, cli_flags=flags,
                              run_dir=os.path.join(results_dir, name))
    branches["eq-vae"]["export_diffusers"] = args.export_diffusers  # the demo's result, as the table's last row
    return base, branches


def run_demo(args):
    """The paper's Table 6 comparison in miniature: fine-tune a pretrained small KL autoencoder (the
    base, standing for SD-VAE) from the same weights in two branches with the same steps and data
    order: a control (standard objective only) and EQ-VAE. Both start a fresh optimizer, as any
    `--vae` fine-tuning does, and use the fine-tuning's low-resolution prior preservation
    (--lowres-prob). The base is the shipped assets/demo-vae-base.pt, or with --demo-base train one
    trained first with the standard objective at --demo-base-lr: its training is chaotic (one seed
    gave bases with rotation errors 0.30 and 0.79 on two CPUs), so a shipped base makes the demo
    repeatable. Every stage ends on an lr decaying to zero (--lr-decay-steps), so each table
    row scores settled weights. Prints one table."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # its branches are processes of their own
        utils.fail("--preset demo runs in one process: start it with python, not torchrun")
    check_args(args, world_size=1)  # a bad flag fails before the previous demo's folder is replaced
    train_base = args.demo_base == "train"
    stray = given_flags(args, ("vae", "demo_base_steps", "demo_base_lr"))
    if stray and not train_base:
        utils.fail(f"{', '.join(stray)}: for the base that --demo-base train trains; add --demo-base train, or remove them")
    run_flags = given_flags(args, ("resume", "run_dir", "restore_optimizer"))
    if run_flags:  # each stage is a fresh run in results/demo/<stage>, which the demo replaces
        utils.fail(f"{', '.join(run_flags)}: not with --preset demo, whose stages are fresh runs under --results-dir")
    if not train_base:
        if not os.path.isfile(args.demo_base):
            utils.fail(f"--demo-base {args.demo_base} is not a file: give an autoencoder file, or 'train' to train the base first")
        try:
            models.load_autoencoder(args.demo_base, args.trust_checkpoint)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            utils.fail(f"--demo-base {args.demo_base}: {str(e).strip(chr(34) + chr(39))}")
    results_dir = os.path.join(args.results_dir, "demo")
    if os.path.isdir(results_dir):
        shutil.rmtree(results_dir)
    base, branches = demo_stages(args, results_dir)
    if base is not None:
        print(f"demo: training the base for {base['max_steps']} standard steps", flush=True)
        main(argparse.Namespace(**base))
    base_path = branches["control"]["vae"]
    print(f"demo: fine-tuning {base_path} for {args.max_steps} steps as control and as EQ-VAE", flush=True)
    rows = {"base": base_path, **{name: os.path.join(b["run_dir"], "autoencoder.pt") for name, b in branches.items()}}
    # the branches are independent: side by side, each on half the threads (on 2 cores, 1.5x
    # sooner than one after the other on both); their log lines interleave, each has its log.txt
    threads = max(1, torch.get_num_threads() // 2)
    print(f"demo: control and EQ-VAE side by side, {threads} thread(s) each", flush=True)
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=run_branch, args=(branch, threads)) for branch in branches.values()]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    unfinished = [name for name in branches if not os.path.isfile(rows[name])]
    if unfinished:  # stopped (SIGTERM/SIGINT saves latest.pt) or failed: no table from a partial run
        raise SystemExit(f"demo: the {' and '.join(unfinished)} branch did not finish; see {results_dir}/<branch>/log.txt")
    x = held_out_batch(argparse.Namespace(**dict(vars(args), num_eval_images=args.num_demo_eval)), None)
    table, trained = {}, {}
    for name, path in rows.items():
        ae = models.load_autoencoder(path, args.trust_checkpoint).eval()
        table[name] = evaluate_batch(ae, x, args)
        if name != "base":
            trained["EQ-VAE" if name == "eq-vae" else name] = ae
    save_figure2(trained, x[:4], os.path.join(results_dir, "figure2.png"), args, scale=0.5)
    save_figure2(trained, x[:4], os.path.join(results_dir, "figure2-rot.png"), args, scale=1.0, k=1)
    lines = ["", f"EQ-VAE demo ({args.num_demo_eval} held-out builtin:{data.parse_builtin(args.data_path)[0]} images, {args.image_size}px)",
             f"{'model':<10} {'rot. eq. error':>15} {'scale eq. error':>16} {'PSNR (dB)':>10}"]
    for name, m in table.items():
        lines.append(f"{name:<10} {m['eq_err_rot']:>15.4f} {m['eq_err_scale']:>16.4f} {m['psnr']:>10.2f}")
    lines.append(f"figures: {results_dir}/figure2.png (tau = scale 0.5), {results_dir}/figure2-rot.png (a quarter "
                 f"turn); columns x, D(E(x)), tau x, D(E(tau x)), D(tau E(x)); rows control and EQ-VAE per image")
    print("\n".join(lines), flush=True)
    utils.write_json(os.path.join(results_dir, "demo.json"), table)
    return table


# ----------------------------------------------------------------------------- flags

DEMO_FLAGS = ("demo_base", "demo_base_steps", "demo_base_lr", "num_demo_eval")
# the demo's pretrained base: results/demo/base/autoencoder.pt of a --demo-base train run (README)
DEMO_BASE = os.path.join(os.path.dirname(__file__), "assets", "demo-vae-base.pt")
PRESETS = {
    # CPU smoke runs and tests: every loss term on (random LPIPS backbone), a few steps
    "tiny": dict(vae="scratch:tiny", data_path="builtin:shapes:64", image_size=64, global_batch_size=4, grad_accum=1,
                 max_steps=4, lr=1e-4, disc_start=0, disc_channels=8, disc_layers=2, lpips_random=True, num_workers=0,
                 log_every=2, ckpt_every=2, eval_every=4, num_eval_images=4, results_dir="results"),
    # the README demo: a control and an EQ-VAE branch fine-tune one pretrained base (see run_demo)
    "demo": dict(demo_base=DEMO_BASE, vae="scratch:small",  # --vae: the architecture --demo-base train starts from
                 data_path="builtin:shapes-plain:20000", image_size=32, global_batch_size=16, grad_accum=1,
                 demo_base_steps=1200, demo_base_lr=1e-3, max_steps=600, lr=3e-4, lr_decay_steps=600,  # the branches at 0.3x the base's lr
                 perceptual_weight=0.0, disc_weight=0.0, num_workers=0,
                 antialias=True,  # a 0.25 downscale of a 32 px image without a low-pass is mostly aliasing
                 lowres_prob=0.25,  # the branches' (official) prior preservation: the scale error encodes 8 px images
                 log_every=100, ckpt_every=600, eval_every=600, num_eval_images=8, results_dir="results"),
}


# --recipe: the settings where the paper and the official code differ (flags given still win)
RECIPES = {
    # the paper: bicubic tau (Sec. 3.3), Eq. 7 without prior preservation; LDM's OpenImages crop
    # (the framework the paper follows, Sec. 4.1); fp32 (TF32 on GPU)
    "paper": dict(interp="bicubic", antialias=False, lowres_prob=0.0, min_crop_frac=0.5, precision="fp32"),
    # the official code: bilinear tau without antialias, low-resolution prior preservation 0.25, fp32
    "official": dict(interp="bilinear", antialias=False, lowres_prob=0.25, min_crop_frac=0.5, precision="fp32"),
}


def recipe_line(args):
    """The recipe that runs, and any of its settings the command line (or a preset) changed."""
    spec = RECIPES[args.recipe]
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in spec.items() if getattr(args, k) != v]
    return (f"recipe {args.recipe}: " + ", ".join(f"{k} {v}" for k, v in spec.items())
            + (f"; changed here: {', '.join(changed)}" if changed else ""))


def quarter_turns(text):
    """'90,180,270' -> (1, 2, 3); only multiples of 90 keep image and latent grids aligned."""
    try:
        angles = [int(a) for a in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give angles in degrees, e.g. 90,180,270") from None
    if not angles or any(a % 90 or not 0 < a < 360 for a in angles):
        raise argparse.ArgumentTypeError(f"{text!r}: angles must be among 90,180,270")
    return tuple(a // 90 for a in angles)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data and run folder
    p.add_argument("--data-path", default=None, help="training images: a folder (recursive) or builtin:shapes[:N[:SEED]]; the paper: OpenImages")
    p.add_argument("--val-data-path", default=None, help="held-out images for the periodic equivariance/PSNR check "
                   "(default: for builtin:NAME:N:SEED the set builtin:NAME:--num-eval-images:SEED+10000, for a folder "
                   "its first --num-eval-images images)")
    p.add_argument("--results-dir", default="results", help="parent folder of the run folders")
    p.add_argument("--run-dir", default=None, help="exact run folder (default: a new numbered folder under --results-dir)")
    p.add_argument("--image-size", type=int, default=256, help="training crop side in pixels (paper: 256)")
    p.add_argument("--crop", choices=["random", "adm", "none"], default="random",
                   help="random: LDM/official training crop (a random square, see --min-crop-frac, resized to --image-size); "
                   "adm: ADM center crop; none: images as they are (all one size; non-square allowed)")
    p.add_argument("--min-crop-frac", type=float, default=None,
                   help="random crop side = short side x U(frac, 1), then resized: a zoom of up to 1/frac (official and LDM: 0.5; "
                   "1: the whole short side; default: the recipe's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips (the official run: off)")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per GPU")
    # model
    p.add_argument("--vae", default="kl-f8", help="starting weights: a name (kl-f8, sd-vae-ft-ema, vq-f16-1024, ...), a path, "
                   "or scratch:CONFIG; the paper fine-tunes LDM's kl-f8 (SD-VAE)")
    p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="allow full unpickling of --vae/--resume files you trust")
    p.add_argument("--resume", default=None, help="continue a run exactly: a checkpoint, or a run folder (uses latest.pt)")
    p.add_argument("--allow-changed-flags", action=argparse.BooleanOptionalAction, default=False,
                   help="let --resume continue with objective or data flags that differ from the checkpoint's (logged)")
    p.add_argument("--restore-optimizer", action=argparse.BooleanOptionalAction, default=False,
                   help="continue the Adam moments and lr stored in a Lightning --vae .ckpt (optimizer_states), as the "
                   "official run does through Lightning's resume_from_checkpoint; --lr still wins when given")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the autoencoder weights per step; 0 disables (paper: off)")
    # EQ-VAE objective
    p.add_argument("--eq-mode", choices=["implicit", "explicit", "explicit-sg"], default="implicit",
                   help="implicit: Eq. 5 (the paper); explicit: Eq. 1 + w ||tau E(x) - E(tau x)||^2 (App. A.1); explicit-sg: with sg[E(tau x)]")
    p.add_argument("--eq-prob", type=float, default=0.5,
                   help="probability that a step uses the equivariance objective, i.e. 1 - p_alpha of Eq. 7 (paper: 0.5)")
    p.add_argument("--eq-start", type=int, default=0, help="standard objective only before this step")
    p.add_argument("--eq-transform", choices=models.EQ_MODES, default="rotation+scale",
                   help="tau family (Table 5 rows): rotation, scale (isotropic), anisotropic, rotation+scale (paper default), rotation+anisotropic")
    p.add_argument("--eq-angles", type=quarter_turns, default=(1, 2, 3),
                   help="rotation angles in degrees, multiples of 90 (paper: 90,180,270)")
    p.add_argument("--eq-scales", type=lambda s: tuple(float(v) for v in s.split(",")), default=None,
                   help="discrete scale set, e.g. 0.25,0.5,0.75 (default: uniform on the 1/latent grid in [0.25, 1))")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="paper: bicubic tau, no prior preservation; official: the official code's bilinear tau without "
                   "antialias and low-res prior preservation 0.25 (both: crop frac 0.5, fp32); printed at start")
    p.add_argument("--interp", choices=models.INTERPOLATIONS, default=None,
                   help="resampling for tau: bicubic (paper), bilinear (official code), area, nearest (default: the recipe's)")
    p.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=None,
                   help="antialias bilinear/bicubic downscaling (paper and official code: off)")
    p.add_argument("--lowres-prob", type=float, default=None,
                   help="on a standard step, probability of reconstructing a randomly downscaled image (official code: 0.25; "
                   "the paper: 0; default: the recipe's)")
    p.add_argument("--explicit-weight", type=float, default=0.1, help="lambda of the explicit loss (App. A.1: 0.1)")
    # standard objective (LDM LPIPSWithDiscriminator / taming VQLPIPSWithDiscriminator)
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS-VGG weight (LDM: 1.0; 0 disables LPIPS)")
    p.add_argument("--lpips-random", action=argparse.BooleanOptionalAction, default=False,
                   help="random VGG backbone for LPIPS (offline smoke runs; labelled in the log)")
    p.add_argument("--kl-weight", type=float, default=None, help="KL weight, KL models only (LDM kl-f8: 1e-6)")
    p.add_argument("--logvar", type=float, default=None,
                   help="LDM's fixed log-variance of the reconstruction term, KL models only (default: the starting checkpoint's, else 0)")
    p.add_argument("--codebook-weight", type=float, default=None, help="VQ loss weight, VQ models only (taming: 1.0)")
    p.add_argument("--disc-weight", type=float, default=None, help="GAN weight times the adaptive weight (LDM kl-f8: 0.5, taming VQ: 0.8; 0 disables)")
    p.add_argument("--disc-start", type=int, default=0, help="step at which the discriminator switches on (EQ-VAE config: 0)")
    p.add_argument("--disc-factor", type=float, default=1.0, help="disc_factor of LDM's loss (LDM: 1.0)")
    p.add_argument("--disc-channels", type=int, default=64, help="PatchGAN base channels (LDM: 64)")
    p.add_argument("--disc-layers", type=int, default=3, help="PatchGAN strided layers (LDM: 3)")
    # optimisation
    p.add_argument("--global-batch-size", type=int, default=80,
                   help="images per micro-batch over all processes; a step sees this x --grad-accum (official run: "
                        "8 GPUs x 10, x 2 = 160; the paper: batch 10 per GPU)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches accumulated per step (official run: 2)")
    p.add_argument("--base-lr", type=float, default=4.5e-6, help="lr per image of effective batch (LDM: 4.5e-6)")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (overrides --base-lr scaling)")
    p.add_argument("--grad-clip", "--max-grad-norm", dest="max_grad_norm", type=float, default=0.0,
                   help="gradient clipping of the autoencoder; 0 disables (LDM: off)")
    p.add_argument("--epochs", type=int, default=5, help="passes over --data-path (paper: 5)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr-decay-steps", type=int, default=0,
                   help="decay the lr linearly to zero over the last N steps (0: constant, the paper)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast dtype (default: the recipe's fp32, TF32 matmuls on GPU: the official run is fp32, and on an "
                   "H200 the kl-f8 step measured faster in TF32 than under bf16 autocast)")
    p.add_argument("--global-seed", type=int, default=0, help="seed of data order, augmentations and tau draws")
    # logging, checkpoints, outputs
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines (losses averaged over the interval and ranks)")
    p.add_argument("--ckpt-every", type=int, default=10_000, help="steps between checkpoints (plus one at the end)")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between equivariance/PSNR checks and Figure 2 grids")
    p.add_argument("--num-eval-images", type=int, default=8, help="images in the fixed held-out batch")
    p.add_argument("--num-demo-eval", type=int, default=64, help="held-out images scored by --preset demo")
    p.add_argument("--demo-base", default=None,
                   help="--preset demo: the pretrained autoencoder both branches fine-tune (default: the shipped "
                        "assets/demo-vae-base.pt), or 'train' to train it first from --vae with the standard objective")
    p.add_argument("--demo-base-steps", type=int, default=None,
                   help="--demo-base train: the base's standard steps (the demo: 1200; default: --max-steps)")
    p.add_argument("--demo-base-lr", type=float, default=None, help="--demo-base train: the base's lr (default: --lr, the branches')")
    p.add_argument("--export-diffusers", default=None, help="also write the final KL model as a diffusers AutoencoderKL folder here")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="tiny: CPU smoke run; demo: the README demo")
    args = p.parse_args(argv)
    p.set_defaults(**RECIPES[args.recipe])  # then the preset's values, then the command line's
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
    args = p.parse_args(argv)
    args.cli_flags = sorted(utils.explicit_flags(p, argv))
    return args


if __name__ == "__main__":
    args = parse_args()
    run_demo(args) if args.preset == "demo" else main(args)
