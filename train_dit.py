"""DiT, SiT and REPA training on cached autoencoder latents (Peebles and Xie 2023; Ma et al. 2024;
Yu et al. 2025).

The first run with --data-path and --vae encodes the dataset into --latents (ADM center crop, each
image and its flip, posterior mean and std; with --cache-images the cropped images too); every
step then samples z ~ q(z|x) from the stored posterior, normalises it, and trains the network with
DDPM's loss (--objective diffusion, DiT) or SiT's interpolant loss (--objective transport). --repa
adds REPA's alignment of the SiT's hidden tokens with a frozen DINOv2's patch tokens of the image.

  CPU smoke:  python train_dit.py --preset tiny          (REPA: python train_dit.py --preset tiny-repa)
  one GPU:    python train_dit.py --model DiT-B/2 --data-path /data/imagenet/train --vae eq-vae-ema \\
                  --latents /data/latents/eq-vae-ema-256 --max-steps 400000
  8 GPUs:     torchrun --nproc_per_node=8 train_dit.py --model SiT-XL/2 --repa --data-path /data/imagenet/train \\
                  --vae eq-vae-ema --latents /data/latents/eq-vae-ema-256-images
  the demo:   python train_dit.py --preset demo
"""
import argparse
import copy
import math
import os
import shutil

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import diffusion
import models
import utils

# ----------------------------------------------------------------------------- helpers


def prepare_latents(args, device):
    """The latent cache: build it when --data-path/--vae are given and --latents holds none, refuse
    it when it was made by another autoencoder, image size or crop. Returns (meta, autoencoder or None)."""
    try:
        meta = data.read_cache_meta(args.latents)
    except RuntimeError as e:
        utils.fail(str(e))
    ae = data.cache_coder(args, "latents", meta, device, "autoencoder", "DiT and SiT used sd-vae-ft-ema")
    if ae is None:
        return meta, None
    if ae.kind != "kl":
        utils.fail(f"--vae {args.vae} is a VQ autoencoder: DiT/SiT need a continuous (KL) one; train MaskGIT on VQ tokens")
    if args.image_size % ae.downsample_factor:
        utils.fail(f"--image-size {args.image_size} is not a multiple of the autoencoder's factor {ae.downsample_factor}")
    lat, patch = args.image_size // ae.downsample_factor, int(args.model.rsplit("/", 1)[1])
    if lat % patch:  # before hours of caching, not after
        utils.fail(f"--model {args.model}: its {patch}x{patch} patches do not tile the {lat}x{lat} latents of "
                   f"--image-size {args.image_size}")
    fingerprint, dataset, vae_spec = data.cache_plan(args, "latents", meta, ae)
    if dataset is None:  # the cache there was made by this autoencoder from these images
        return meta, ae
    info = dict(vae=vae_spec, vae_scaling_factor=ae.scaling_factor, vae_shift_factor=ae.shift_factor,
                data_path=args.data_path)

    @torch.no_grad()
    def encode(x):
        posterior = ae.encode(x)
        return posterior.mean, posterior.std

    try:
        meta = data.build_latent_cache(args.latents, dataset, encode, fingerprint, (ae.latent_channels, lat, lat), info,
                                       batch_size=args.cache_batch_size, num_workers=args.num_workers,
                                       dtype=args.cache_dtype, device=device, shard_images=args.cache_shard_size,
                                       store_images=args.cache_images)
    except RuntimeError as e:
        utils.fail(str(e))
    return meta, ae


def check_cache_images(args):
    """--repa (or --cache-images) on a cache that holds latents only: refused before anything loads."""
    try:
        meta = data.read_cache_meta(args.latents)
    except RuntimeError as e:
        utils.fail(str(e))
    if meta is not None and args.cache_images and not meta.get("images"):
        utils.fail(f"{'--repa needs the images in the cache (its encoder sees them)' if args.repa else '--cache-images'}"
                   f", and --latents {args.latents} holds latents only: build a new cache with --data-path, --vae and "
                   f"--cache-images into another --latents folder")


def load_encoders(args, device):
    """REPA's frozen target encoders, from --encoder (comma-separated: one projector each). `random`
    is a randomly initialised ViT-S/14, seeded by --global-seed, for offline smoke runs."""
    encoders = []
    for spec in args.encoder.split(","):
        if spec == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.global_seed)
                encoder = models.DINOv2_models["dinov2_vits14"]().eval().requires_grad_(False)
        else:
            try:
                encoder = models.load_dinov2(spec, args.trust_checkpoint)
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                utils.fail(f"--encoder {spec}: {str(e).strip(chr(34) + chr(39))}")
        encoders.append(encoder.to(device))
    return encoders


def latent_recipe(args, meta, notes):
    """How the generator's inputs relate to the autoencoder's latents (stored with the model, with
    the cache's data fingerprint, which --resume checks)."""
    latent = dict(vae=meta["vae"], vae_hash=meta["vae_hash"], norm=args.latent_norm, data=meta.get("data"),
                  count=meta["count"])
    if args.latent_norm == "scale":
        latent.update(scale=meta["vae_scaling_factor"], shift=meta["vae_shift_factor"])
        if meta["vae_scaling_factor"] == 1.0 and "latent_norm" not in args.cli_flags:
            notes.append(f"{meta['vae']} has no published latent scale (1.0): the latents go in unnormalised; "
                         f"--latent-norm channel scales them by the cache's statistics")
    else:
        # the std of what the model sees: sampled z, or the posterior mean alone
        std = meta["channel_std"] if args.latent_sample else meta.get("channel_std_of_mean")
        if std is None:  # a cache built before the mean's statistics were stored
            std = meta["channel_std"]
            notes.append("this cache stores the channel std of sampled latents only: --no-latent-sample scales the "
                         "posterior means by it (they are a little narrower); rebuild the cache for their own std")
        latent.update(mean=meta["channel_mean"], std=std)
    return latent


@torch.no_grad()
def save_sample_grid(model, recipe, objective, ae, path, args, device):
    """A fixed-noise, fixed-label grid from the EMA model (the raw one without EMA): one column per
    class, --grid-rows rows."""
    classes = utils.grid_labels(model.num_classes)
    y = torch.tensor([c for _ in range(args.grid_rows) for c in classes], device=device)
    noise = diffusion.SampleNoise(args.global_seed, range(len(y)), device)
    was_training = model.training
    model.eval()  # no label dropout: it would also draw from the training's RNG stream
    z = diffusion.generate(model, objective, noise, y, args.sampler, args.num_steps, args.cfg_scale)
    model.train(was_training)
    images = (ae.decode(data.denormalize_latents(z.float(), recipe["latent"])).clamp(-1, 1) + 1) / 2
    names = recipe["class_names"] or [str(c) for c in range(model.num_classes)]
    columns = [images.view(args.grid_rows, len(classes), *images.shape[1:])[:, j] for j in range(len(classes))]
    utils.save_labelled_grid(columns, [names[c] for c in classes], path)


# ----------------------------------------------------------------------------- main


def main(args):
    rank, world_size, device = utils.setup_distributed()
    # resume: the architecture, objective and data come from the checkpoint's arguments, and so do the flags
    # not given now (checked and applied with the rest: precision, batch size, ...)
    resume_path, resume_ckpt = utils.start_cache_run(args, FIXED_ON_RESUME, check_args, world_size, "latents")
    utils.seed_everything(args.global_seed)  # a scratch autoencoder for the cache: the same weights every time
    precision, autocast = utils.precision_setup(args.precision, device)

    # REPA's encoders (downloads fail here, before the cache is built), the latents (built on first
    # use), then the network, before anything is written
    check_cache_images(args)
    encoders = load_encoders(args, device) if args.repa else []
    meta, ae = prepare_latents(args, device)
    if meta["image_size"] != args.image_size:  # an existing cache read without --data-path
        if "image_size" in args.cli_flags:
            utils.fail(f"--latents {args.latents} holds {meta['image_size']} px images, not --image-size {args.image_size}")
        args.image_size = meta["image_size"]  # so that args.json records what the run trains on
    C, h, w = meta["latent_shape"]
    # REPA feeds the network t as it is (time_input "repa"); SiT's own runs feed 1 - t
    objective_spec = (dict(kind="diffusion", num_timesteps=1000) if args.objective == "diffusion" else
                      dict(kind="transport", path=args.path_type, prediction=args.prediction,
                           time_input="repa" if args.repa else "sit"))
    if resume_ckpt is not None:  # the run's own objective (its time input may have come from --init-from)
        objective_spec = dict(resume_ckpt["generator"]["objective"])
    repa = dict(z_dims=[e.embed_dim for e in encoders], encoder_depth=args.encoder_depth, projector_dim=args.projector_dim,
                qk_norm=args.qk_norm) if args.repa else dict(qk_norm=args.qk_norm)
    recorded = resume_ckpt["generator"]["latent"] if resume_ckpt is not None else {}
    problem = data.check_resumed_cache(recorded, meta, "latents", args.latents)
    if problem:
        utils.fail(problem)
    utils.seed_everything(args.global_seed)  # the initial weights depend on the seed only, not on what caching drew
    try:
        model = models.build_generator(args.model, input_size=h, in_channels=C, num_classes=meta["num_classes"],
                                       learn_sigma=args.learn_sigma, class_dropout_prob=args.class_dropout_prob, **repa)
    except ValueError as e:
        utils.fail(f"--model {args.model}: {e}")
    grid = h // model.patch_size  # the generator's token grid, which the encoders' patch grid must equal
    for encoder in encoders:
        encoder.resample_pos_embed(grid)  # REPA resizes DINOv2's 37 x 37 table once, to the token grid
    notes = []
    # a resumed run keeps its normalisation numbers (the cache may have moved: its place is today's)
    latent = dict(recorded, vae=meta["vae"]) if recorded else latent_recipe(args, meta, notes)
    recipe = dict(model=args.model, config=model.config, image_size=meta["image_size"], objective=objective_spec,
                  latent=latent, class_names=meta["class_names"])
    if args.repa:
        recipe["repa"] = dict(encoder=args.encoder, proj_coeff=args.proj_coeff)
    if args.init_from and resume_ckpt is None:
        try:
            start, start_recipe = models.load_generator(args.init_from, args.model, args.trust_checkpoint)
            if start.learn_sigma != model.learn_sigma:
                utils.fail(f"--init-from {args.init_from} {'predicts' if start.learn_sigma else 'has no'} sigma channels: "
                           f"pass --{'' if start.learn_sigma else 'no-'}learn-sigma to match it")
            sd = start.state_dict()
            fresh = [k for k in model.state_dict() if k not in sd]
            if fresh and all(k.startswith("projectors.") for k in fresh):  # a plain SiT into a REPA model
                sd.update({k: v for k, v in model.state_dict().items() if k in fresh})
                notes.append(f"--init-from {args.init_from} has no REPA projectors: they start fresh")
            model.load_state_dict(sd, strict=True)
            # a network keeps the time it was trained in: a plain SiT (t = 1 at the data) fed REPA's t
            # would see time reversed and its velocity negated (recorded in the recipe, for sample.py)
            start_time = start_recipe.get("objective", {}).get("time_input")
            if objective_spec["kind"] == "transport" and start_time and start_time != objective_spec["time_input"]:
                objective_spec["time_input"] = start_time
                notes.append(f"--init-from {args.init_from} was trained with {'SiT' if start_time == 'sit' else 'REPA'}'s "
                             f"time input: the run keeps it")
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            utils.fail(f"--init-from {args.init_from} does not fit --model {args.model} on {C}x{h}x{w} latents with "
                       f"{meta['num_classes']} classes: {str(e).strip(chr(34) + chr(39))}")
        notes.append(f"starting weights from {args.init_from}")
    objective = diffusion.make_objective(objective_spec, model)
    ae = data.grid_coder(args, meta, ae, device, "autoencoder")
    try:
        dataset = data.LatentDataset(args.latents, flip=args.flip, seed=args.global_seed, images=args.repa)
    except (OSError, RuntimeError) as e:
        utils.fail(str(e))

    # run folder, logger, args.json
    run_dir, logger, ckpt_dir = utils.open_run(args, resume_path, f"{args.model}-{args.objective}", world_size, device,
                                               precision, notes)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{args.model} ({num_params / 1e6:.2f}M parameters) on {C}x{h}x{w} latents of {meta['vae']}, "
                f"{meta['num_classes']} classes; objective {args.objective}"
                + (f" ({args.path_type} path, {args.prediction} prediction)" if args.objective == "transport" else "")
                + (f"; REPA: block {args.encoder_depth} aligned with {args.encoder} patch tokens on a {grid}x{grid} "
                   f"grid, --proj-coeff {args.proj_coeff}" if args.repa else "")
                + f"; latent normalisation {args.latent_norm}: "
                + (f"scale {recipe['latent']['scale']:.5g}" if args.latent_norm == "scale" else
                   "per-channel mean " + ", ".join(f"{v:.3f}" for v in meta["channel_mean"]) + ", std "
                   + ", ".join(f"{v:.3f}" for v in meta["channel_std"])))

    # model, EMA (a copy of the initial weights, as DiT; none with --ema-decay 0), optimizer
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if args.ema_decay > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # data: each rank reads its shard of one seeded permutation per epoch
    per_rank, steps_per_epoch, max_steps = utils.epoch_plan(len(dataset), f"the cache {args.latents}", args.global_batch_size,
                                                            world_size, args.max_steps, args.epochs)
    logger.info(f"{len(dataset)} cached images, {steps_per_epoch} steps per epoch, {max_steps} steps, "
                f"global batch {args.global_batch_size}")

    step = 0
    utils.seed_everything(args.global_seed * world_size + rank)  # per-rank noise, t and label dropout
    if resume_ckpt is not None:
        step = utils.restore_training(resume_ckpt, model, ema, opt, scaler, rank, world_size, args.global_seed, logger)
        logger.info(f"resumed from {resume_path} at step {step}")
    for group in opt.param_groups:
        group["lr"] = args.lr  # the command line's lr wins over the checkpoint's
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)
    latent = recipe["latent"]
    if "random" in args.encoder.split(",") and args.repa:
        logger.info("--encoder random: a randomly initialised ViT-S/14 gives the alignment targets; they mean "
                    "nothing (offline smoke runs only), and the checkpoint says so")

    def save():
        utils.save_step({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                         "epoch": step // steps_per_epoch, "args": vars(args), "generator": recipe}, ckpt_dir, step,
                        utils.rng_state())

    # training loop; SIGTERM/SIGINT finish the current step, save and exit
    stop = utils.StopSignal()
    log = utils.IntervalLog(logger, args.log_every, max_steps, args.global_batch_size, device)
    try:
        for batch in data.step_batches(dataset, step, max_steps, steps_per_epoch, per_rank, args.global_seed, rank,
                                       world_size, args.num_workers, pin_memory=device.type == "cuda"):
            moments, y = batch[0].to(device, non_blocking=True), batch[-1].to(device, non_blocking=True)
            mean, std = moments[:, 0], moments[:, 1]
            z = mean + std * torch.randn_like(mean) if args.latent_sample else mean
            x = data.normalize_latents(z, latent)
            with torch.autocast(**autocast):
                if encoders:  # the targets, without gradients (the encoders are frozen)
                    with torch.no_grad():
                        images = batch[1].to(device, non_blocking=True)
                        targets = [models.encoder_targets(e, images, grid) for e in encoders]
                terms = objective.training_losses(train_model, x, y)
                loss = loss_total = terms["loss"].mean()
                if encoders:  # REPA: loss + lambda * alignment (lambda = --proj-coeff, 0.5)
                    loss_proj = diffusion.alignment_loss(terms["projected"], targets).mean()
                    loss_total = loss + args.proj_coeff * loss_proj
            grad_norm, nonfinite, stop_now = utils.optimizer_step(loss_total, model.parameters(), opt, scaler,
                                                                  args.grad_clip, stop.requested, device)
            if nonfinite:
                utils.stop_nonfinite(logger, step, ckpt_dir, "Lower --lr, set --grad-clip or use --precision fp32")
            if ema is not None:
                utils.update_ema(ema, model, args.ema_decay)
            step += 1
            log.add(step, args.lr, dict(loss=loss, grad_norm=grad_norm, **(dict(loss_proj=loss_proj) if encoders else {})))
            if utils.due(step, args.ckpt_every, max_steps) or stop_now:
                save()
            if utils.due(step, args.sample_every, max_steps):
                grid_model = ema if ema is not None else model
                utils.save_step_grid(lambda path: save_sample_grid(grid_model, recipe, objective, ae, path, args, device),
                                     run_dir, step, logger)
            if stop_now and step < max_steps:  # on the last step the run just finishes
                utils.exit_on_stop(logger, ckpt_dir, step, run_dir)
        logger.info(f"done: {ckpt_dir}/latest.pt; sample with: python sample.py --ckpt {ckpt_dir}/latest.pt")
    finally:
        logger.close()
        stop.close()
        utils.cleanup()
    return run_dir


def check_args(args, world_size):
    """Bad input fails here, before any model is built or any file written."""
    data.check_cache_flags(args, world_size, "latents")
    utils.check_ranges(args, rates=("lr", "grad_clip", "weight_decay", "proj_coeff"),
                       below_one=("ema_decay", "class_dropout_prob"),
                       counts=("log_every", "ckpt_every", "num_steps", "grid_rows", "cache_batch_size", "cache_shard_size",
                               "encoder_depth", "projector_dim", "image_size", "epochs", "max_steps"),
                       zero_or_more=("num_workers",))
    if not math.isfinite(args.cfg_scale):
        utils.fail(f"--cfg-scale {args.cfg_scale} is not a number")
    if args.objective == "diffusion" and args.num_steps > 1000:
        utils.fail(f"--num-steps {args.num_steps}: the diffusion samplers take at most the 1000 training timesteps")
    if args.repa:
        if args.objective != "transport" or not args.model.startswith("SiT"):
            utils.fail(f"--repa trains a SiT with the interpolant (REPA's recipe): use a SiT-* --model, not {args.model} "
                       f"with --objective {args.objective}")
        for spec in args.encoder.split(","):
            if spec != "random" and spec not in models.DINOv2_models and not os.path.isfile(spec):
                utils.fail(f"--encoder {spec} is neither a DINOv2 name ({', '.join(models.DINOv2_models)}), a file, "
                           f"nor random")
        if args.data_path and not args.cache_images:
            utils.fail("--repa with --no-cache-images: the encoder needs the images, so the cache must keep them")
    if (args.objective == "diffusion") != (args.sampler in ("ddpm", "ddim")):
        utils.fail(f"--sampler {args.sampler} does not fit --objective {args.objective} (diffusion: ddpm, ddim; "
                   f"transport: euler, heun, sde)")
    if args.objective == "diffusion" and args.sample_every > 0 and args.num_steps < 2:
        utils.fail("--num-steps 1: one respaced diffusion step samples at t = 0 on pure noise; give 2 or more")
    if args.class_dropout_prob == 0 and args.cfg_scale != 1 and args.sample_every > 0:
        utils.fail(f"--cfg-scale {args.cfg_scale} for the sample grids needs the null class that label dropout trains: "
                   f"--class-dropout-prob 0 has none; pass --cfg-scale 1 (or --sample-every 0)")
    depth = models.DIT_SIZES[args.model.split("-")[1].split("/")[0]][0]
    if args.repa and args.encoder_depth > depth:
        utils.fail(f"--encoder-depth {args.encoder_depth}: {args.model} has {depth} blocks")


# ----------------------------------------------------------------------------- the demo


def run_demo(args):
    """The README demo: the autoencoder of `train_vae.py --preset demo` (trained first when missing),
    its latents of builtin:shapes, and a small DiT whose sample grid shows the ten shape classes."""
    demo_dir = os.path.join(args.results_dir, "demo-dit")
    # --latents (e.g. a cache kept from an earlier demo) and --run-dir given on the command line win
    folders = {k: os.path.join(demo_dir, name) for k, name in (("latents", "latents"), ("run_dir", "run"))
               if k not in args.cli_flags}
    demo_args = argparse.Namespace(**dict(vars(args), preset=None, **folders))
    check_args(demo_args, int(os.environ.get("WORLD_SIZE", 1)))  # before the autoencoder demo and any deletion
    if args.vae == PRESETS["demo"]["vae"] and not os.path.isfile(args.vae):  # only the demo's own autoencoder
        import train_vae

        print(f"demo: {args.vae} is missing, training it first (python train_vae.py --preset demo)", flush=True)
        train_vae.run_demo(train_vae.parse_args(["--preset", "demo"]))
    # the previous demo is replaced, but for the folders given on the command line (even inside it)
    kept = [os.path.abspath(getattr(args, k)) for k in ("latents", "run_dir") if k in args.cli_flags]
    for name in os.listdir(demo_dir) if os.path.isdir(demo_dir) else []:
        path = os.path.abspath(os.path.join(demo_dir, name))
        if not any(k == path or k.startswith(path + os.sep) for k in kept):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    run_dir = main(demo_args)
    grid = os.path.join(run_dir, f"samples-{args.max_steps:07d}.png")
    os.makedirs(demo_dir, exist_ok=True)
    shutil.copyfile(grid, os.path.join(demo_dir, "samples.png"))
    print(f"\nDiT demo: {args.model} trained {args.max_steps} steps on {args.data_path} latents of {args.vae}\n"
          f"samples (one column per class, EMA weights, {args.sampler} {args.num_steps} steps, cfg {args.cfg_scale}): "
          f"{demo_dir}/samples.png", flush=True)


# ----------------------------------------------------------------------------- flags

# what a resumed run always takes from its checkpoint (anything else given on the command line wins)
FIXED_ON_RESUME = ("model", "objective", "path_type", "prediction", "learn_sigma", "class_dropout_prob", "latent_norm",
                   "latent_sample", "image_size", "flip", "global_seed", "repa", "encoder", "encoder_depth", "projector_dim",
                   "qk_norm", "global_batch_size")

PRESETS = {
    # CPU smoke runs and tests: a random tiny autoencoder, a few steps of the smallest DiT
    "tiny": dict(vae="scratch:tiny", data_path="builtin:shapes:32", image_size=32, latents="results/latents-tiny",
                 model="DiT-T/2", global_batch_size=4,
                 max_steps=4, log_every=2, ckpt_every=2, sample_every=4, num_steps=4, grid_rows=1, cache_batch_size=8,
                 num_workers=0, results_dir="results"),
    # the same with REPA: a SiT aligned with a random ViT-S/14 (offline: no DINOv2 weights here)
    "tiny-repa": dict(vae="scratch:tiny", data_path="builtin:shapes:32", image_size=32, latents="results/latents-tiny-images",
                      model="SiT-T/2", repa=True,
                      encoder="random", encoder_depth=2, projector_dim=64, global_batch_size=4, max_steps=4, log_every=2,
                      ckpt_every=2, sample_every=4, num_steps=4, grid_rows=1, cache_batch_size=8, num_workers=0,
                      results_dir="results"),
    # the README demo (see run_demo)
    # upright shapes without flips: one outline per class, so the small DiT's samples show the class
    "demo": dict(vae="results/demo/eq-vae/autoencoder.pt", data_path="builtin:shapes-upright:10000", flip=False,
                 image_size=32, model="DiT-T/2", global_batch_size=32, max_steps=10000, lr=1e-3, ema_decay=0.999,
                 log_every=1000, ckpt_every=10000, sample_every=10000, num_steps=50, cfg_scale=4.0, grid_rows=4,
                 cache_batch_size=64, num_workers=0, latent_norm="channel", results_dir="results"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data: the latent cache
    p.add_argument("--latents", default=None, help="latent cache folder; built from --data-path and --vae when it holds none")
    p.add_argument("--data-path", default=None, help="images to cache: a class-folder tree (ImageNet) or builtin:shapes[:N[:SEED]]")
    p.add_argument("--vae", default=None, help="autoencoder whose latents are cached: a name, a path or scratch:CONFIG "
                   "(DiT/SiT: sd-vae-ft-ema; EQ-VAE: eq-vae-ema or your train_vae.py output); later runs read it from the cache")
    p.add_argument("--image-size", type=int, default=256, help="ADM center crop in pixels (paper: 256)")
    p.add_argument("--cache-batch-size", type=int, default=32, help="images per encoder forward while caching, per process")
    p.add_argument("--cache-shard-size", type=int, default=1000, help="images per cache shard file (each with its flip)")
    p.add_argument("--cache-dtype", choices=["float16", "float32"], default="float16", help="storage of the posterior mean and std")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the cropped uint8 images in the cache too (REPA's encoder needs them; ImageNet at 256 px: "
                        "~250 GB); default: on with --repa")
    p.add_argument("--latent-sample", action=argparse.BooleanOptionalAction, default=True,
                   help="z ~ q(z|x) from the stored mean and std at every step (DiT); --no-latent-sample trains on the mean")
    p.add_argument("--latent-norm", choices=["scale", "channel"], default="scale",
                   help="scale: (z - shift) x the autoencoder's scaling factor (0.18215 for SD-VAE, DiT's choice); "
                        "channel: the cache's per-channel mean and std (for autoencoders without a published factor)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (the cached flipped copies; default: on, as DiT; off with --repa, as REPA)")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per GPU")
    p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="allow full unpickling of checkpoints you trust")
    # model and objective
    p.add_argument("--model", choices=list(models.DiT_models) + list(models.SiT_models), default="DiT-XL/2",
                   help="architecture: the paper's Tables 1, 2, 5, 6 train DiT-B/2, Table 4 SiT-XL/2 and DiT-XL/2")
    p.add_argument("--objective", choices=["diffusion", "transport"], default=None,
                   help="diffusion: DDPM, epsilon prediction (DiT's default); transport: interpolant (SiT's default)")
    p.add_argument("--path-type", choices=["linear", "gvp"], default="linear", help="transport path (SiT: linear)")
    p.add_argument("--prediction", choices=["velocity", "noise", "score"], default="velocity", help="transport target (SiT: velocity)")
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="predict the DDPM variance too (default: on, as DiT; SiT keeps the channels and ignores them; "
                        "off with --repa, as REPA's SiT)")
    p.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance (0.1)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False,
                   help="LayerNorm on each head's queries and keys (REPA's --qk-norm; off in its released model)")
    p.add_argument("--init-from", default=None, help="starting weights: a released name (DiT-XL/2-256, ...) or a checkpoint")
    p.add_argument("--resume", default=None, help="continue a run exactly: a checkpoint, or a run folder (uses latest.pt)")
    # REPA (Yu et al. 2025)
    p.add_argument("--repa", action=argparse.BooleanOptionalAction, default=False,
                   help="align the SiT's tokens after block --encoder-depth with a frozen encoder's patch tokens (REPA)")
    p.add_argument("--encoder", default="dinov2_vitb14",
                   help="REPA's target encoder(s), comma-separated: a DINOv2 name (" + ", ".join(models.DINOv2_models)
                        + "; weights downloaded once), a DINOv2 .pth, or random (random ViT-S/14: offline smoke runs only)")
    p.add_argument("--encoder-depth", type=int, default=8, help="block whose output is projected and aligned (REPA, XL: 8)")
    p.add_argument("--projector-dim", type=int, default=2048, help="hidden width of REPA's projector MLP (2048)")
    p.add_argument("--proj-coeff", type=float, default=0.5, help="weight lambda of the alignment loss (REPA: 0.5)")
    # optimisation (DiT's recipe)
    p.add_argument("--global-batch-size", type=int, default=256, help="images per step over all processes (256)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant (1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay per step (0.9999); 0 keeps no EMA (grids and sample.py then use the raw weights)")
    p.add_argument("--grad-clip", type=float, default=None, help="max gradient norm; 0 disables (default: DiT, SiT off; REPA 1.0)")
    p.add_argument("--epochs", type=int, default=1400, help="passes over the cache (DiT: 1400)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs); the paper's curves: 400K")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the network (its label dropout then draws from inductor's RNG, so a "
                        "compiled run's numbers are not the eager run's)")
    p.add_argument("--global-seed", type=int, default=0, help="seed of initialisation, data order, noise and sample grids")
    # run folder, logging, checkpoints, sample grids
    p.add_argument("--results-dir", default="results", help="parent folder of the run folders")
    p.add_argument("--run-dir", default=None, help="exact run folder (default: a new numbered folder under --results-dir)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines (averaged over the interval and ranks)")
    p.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints (plus one at the end)")
    p.add_argument("--sample-every", type=int, default=10_000, help="steps between sample grids from the EMA model; 0 disables")
    p.add_argument("--sampler", choices=diffusion.SAMPLERS, default=None, help="grid sampler (default: ddim for diffusion, euler for transport)")
    p.add_argument("--num-steps", type=int, default=50, help="sampling steps of the grid")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the grid (SiT's logged samples: 4.0)")
    p.add_argument("--grid-rows", type=int, default=2, help="samples per class in the grid")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="tiny: CPU smoke run; tiny-repa: the same with REPA; demo: the README demo")
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)  # flags given on the command line still win over the preset
    args.cli_flags = sorted(utils.explicit_flags(p, argv))
    if args.objective is None:  # DiT trains with DDPM, SiT with the interpolant (the official recipes)
        args.objective = "transport" if args.model.startswith("SiT") else "diffusion"
    if args.sampler is None:
        args.sampler = "ddim" if args.objective == "diffusion" else "euler"
    if args.grad_clip is None:  # REPA clips at 1.0, DiT and SiT do not clip
        args.grad_clip = 1.0 if args.repa else 0.0
    if args.cache_images is None:
        args.cache_images = args.repa
    if args.flip is None:  # DiT flips; REPA's dataset has no flips
        args.flip = not args.repa
    return args


if __name__ == "__main__":
    args = parse_args()
    run_demo(args) if args.preset == "demo" else main(args)
