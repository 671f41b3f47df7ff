"""MaskGIT training on cached VQ tokens (Chang et al. 2022), with MaskGIT-pytorch v1.0's recipe
(Besnier and Chen 2023), the paper's Table 3 setting.

The first run with --data-path and --vae encodes the dataset into --tokens (ADM center crop, each
image and its flip, codebook indices); every step then masks each sample's tokens with a ratio drawn
from the arccos schedule and trains the bidirectional transformer to predict them: cross-entropy on
the masked tokens with label smoothing 0.1, 10% of labels dropped to the null class for guidance.

  CPU smoke:  python train_maskgit.py --preset tiny
  one GPU:    python train_maskgit.py --model MaskGIT-B --data-path /data/imagenet/train --vae vq-f16-1024 \\
                  --trust-checkpoint --tokens /data/tokens/vq-f16-1024-256
  8 GPUs:     torchrun --nproc_per_node=8 train_maskgit.py --model MaskGIT-B --tokens /data/tokens/eq-vq-256
"""
import argparse
import copy

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import diffusion
import models
import utils

# ----------------------------------------------------------------------------- helpers


def prepare_tokens(args, device):
    """The token cache: build it when --data-path/--vae are given and --tokens holds none, refuse it
    when it was made by another VQ model or image size. Returns (meta, VQ model or None)."""
    try:
        meta = data.read_cache_meta(args.tokens, data.TOKEN_CACHE_FORMAT)
    except RuntimeError as e:
        utils.fail(str(e))
    ae = data.cache_coder(args, "tokens", meta, device, "VQ model", "MaskGIT-pytorch: taming's vq-f16-1024")
    if ae is None:
        return meta, None
    if ae.kind != "vq":
        utils.fail(f"--vae {args.vae} is a continuous (KL) autoencoder: MaskGIT needs a VQ model's tokens; "
                   f"train DiT/SiT on continuous latents")
    if args.image_size % ae.downsample_factor:
        utils.fail(f"--image-size {args.image_size} is not a multiple of the VQ model's factor {ae.downsample_factor}")
    if ae.quantize.n_embed > 1 << 15:  # before the folder scan and any write
        utils.fail(f"--vae {args.vae}: a codebook of {ae.quantize.n_embed} codes does not fit the cache's int16 tokens")
    fingerprint, dataset, vae_spec = data.cache_plan(args, "tokens", meta, ae)
    if dataset is None:  # the cache there was made by this VQ model from these images
        return meta, ae

    @torch.no_grad()
    def encode(x):
        return ae.quantize_features(ae.encode_features(x))[2]  # (N, h, w) codebook indices

    try:
        meta = data.build_token_cache(args.tokens, dataset, encode, fingerprint, args.image_size // ae.downsample_factor,
                                      ae.quantize.n_embed, dict(vae=vae_spec, data_path=args.data_path),
                                      batch_size=args.cache_batch_size, num_workers=args.num_workers, device=device,
                                      shard_images=args.cache_shard_size)
    except (RuntimeError, ValueError) as e:
        utils.fail(str(e))
    return meta, ae


def draw_mask(z, mode):
    """MaskGIT-pytorch's masking: one ratio per sample from the schedule (r ~ U(0, 1)), then each
    token masked independently with that probability. -> bool (N, h, w)."""
    ratio = models.mask_ratio(torch.rand(z.shape[0], device=z.device), mode)
    return torch.rand(z.shape, device=z.device) < ratio.view(-1, 1, 1)


def masked_token_loss(model, z, y, mask, mask_token, label_smoothing):
    """The objective: the network sees z with the masked tokens replaced by the mask token and is
    scored on those tokens alone, against z (mean cross-entropy with label smoothing over the masked
    tokens of the global batch; v1.0 averages over every token, masked or not: see the README).
    -> (loss, logits, token_weight): a per-token sum on this rank times token_weight, averaged over
    the ranks, is the global batch's mean over its masked tokens."""
    logits = model(torch.where(mask, mask_token, z), y)  # (N, T, K)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), z.flatten(), label_smoothing=label_smoothing,
                                reduction="none")  # (N * T,)
    mask = mask.flatten().float()
    # ranks mask different numbers of tokens: each rank's sum over the global count, times the world
    # size that DDP's gradient average divides by, so the objective does not depend on the GPU count
    count, world_size = utils.global_sum(mask.sum())
    token_weight = world_size / count.clamp(min=1)
    return (per_token * mask).sum() * token_weight, logits, token_weight


@torch.no_grad()
def save_sample_grid(model, ae, class_names, path, args, device):
    """A fixed-label, fixed-seed grid: one column per class, --grid-rows rows, --num-steps steps."""
    classes = utils.grid_labels(model.num_classes)
    y = torch.tensor([c for _ in range(args.grid_rows) for c in classes], device=device)
    generators = diffusion.SampleNoise(args.global_seed, range(len(y)), device).generators
    was_training = model.training
    model.eval()
    z = models.maskgit_generate(model, y, generators, args.num_steps, args.sched_mode, args.r_temp, args.sm_temp,
                                args.cfg_scale)
    model.train(was_training)
    images = (ae.decode_indices(z).float().clamp(-1, 1) + 1) / 2
    names = class_names or [str(c) for c in range(model.num_classes)]
    columns = [images.view(args.grid_rows, len(classes), *images.shape[1:])[:, j] for j in range(len(classes))]
    utils.save_labelled_grid(columns, [names[c] for c in classes], path)


# ----------------------------------------------------------------------------- main


def main(args):
    rank, world_size, device = utils.setup_distributed()
    # resume: the architecture, masking and data come from the checkpoint's arguments, and so do the flags
    # not given now (checked and applied with the rest: precision, batch size, ...)
    resume_path, resume_ckpt = utils.start_cache_run(args, FIXED_ON_RESUME, check_args, world_size, "tokens")
    utils.seed_everything(args.global_seed)  # a scratch autoencoder for the cache: the same weights every time
    precision, autocast = utils.precision_setup(args.precision, device)

    # tokens (cached on first use), then the network, before anything is written
    meta, ae = prepare_tokens(args, device)
    h = meta["token_grid"]
    recorded = resume_ckpt["maskgit"]["tokens"] if resume_ckpt is not None else {}
    problem = data.check_resumed_cache(recorded, meta, "tokens", args.tokens)
    if problem:
        utils.fail(problem)
    utils.seed_everything(args.global_seed)  # the initial weights depend on the seed only, not on what caching drew
    try:
        model = models.MaskGIT_models[args.model](input_size=h, codebook_size=meta["codebook_size"],
                                                  num_classes=meta["num_classes"], dropout=args.dropout)
    except ValueError as e:
        utils.fail(f"--model {args.model}: {e}")
    try:
        models.unmask_schedule(model.num_tokens, args.num_steps, args.sched_mode)
    except ValueError as e:
        utils.fail(f"--num-steps {args.num_steps}: {e}")
    recipe = models.maskgit_recipe(args.model, model.config, meta["image_size"], meta["vae"], meta["vae_hash"],
                                   meta["class_names"])
    recipe["tokens"].update(data=meta.get("data"), count=meta["count"])  # what --resume checks
    recipe["class_dropout_prob"] = args.class_dropout_prob  # 0: the null class is untrained, sample.py refuses guidance
    notes = []
    if args.init_from and resume_ckpt is None:
        try:
            start, _ = models.load_maskgit(args.init_from, args.model, args.trust_checkpoint)
            model.load_state_dict(start.state_dict(), strict=True)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            utils.fail(f"--init-from {args.init_from} does not fit --model {args.model} on {h}x{h} tokens of "
                       f"{meta['codebook_size']} codes with {meta['num_classes']} classes: {str(e).strip(chr(34) + chr(39))}")
        notes.append(f"starting weights from {args.init_from}")
    ae = data.grid_coder(args, meta, ae, device, "VQ model")
    try:
        dataset = data.TokenDataset(args.tokens, flip=args.flip, seed=args.global_seed)
    except (OSError, RuntimeError) as e:
        utils.fail(str(e))

    # run folder, logger, args.json
    run_dir, logger, ckpt_dir = utils.open_run(args, resume_path, args.model, world_size, device, precision, notes)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"{args.model} ({num_params / 1e6:.2f}M parameters) on {h}x{h} tokens of {meta['vae']} "
                f"({meta['codebook_size']} codes), {meta['num_classes']} classes; {args.mask_schedule} masking, "
                f"label smoothing {args.label_smoothing}, label dropout {args.class_dropout_prob}")

    # model, optional EMA (v1.0 keeps none), AdamW with v1.0's betas
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if args.ema_decay > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.96), weight_decay=args.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # data: each rank reads its shard of one seeded permutation per epoch
    per_rank, steps_per_epoch, max_steps = utils.epoch_plan(len(dataset), f"the cache {args.tokens}", args.global_batch_size,
                                                            world_size, args.max_steps, args.epochs)
    logger.info(f"{len(dataset)} cached images, {steps_per_epoch} steps per epoch, {max_steps} steps, "
                f"global batch {args.global_batch_size}, {args.warmup_steps} warm-up steps")

    step = 0
    utils.seed_everything(args.global_seed * world_size + rank)  # per-rank masks, dropout and label dropout
    if resume_ckpt is not None:
        step = utils.restore_training(resume_ckpt, model, ema, opt, scaler, rank, world_size, args.global_seed, logger)
        logger.info(f"resumed from {resume_path} at step {step}")
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
    if args.compile:
        train_model = torch.compile(train_model)

    def save():
        utils.save_step({"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "opt": opt.state_dict(), "scaler": scaler.state_dict(), "step": step,
                         "epoch": step // steps_per_epoch, "args": vars(args), "maskgit": recipe}, ckpt_dir, step,
                        utils.rng_state())

    # training loop; SIGTERM/SIGINT finish the current step, save and exit
    stop = utils.StopSignal()
    log = utils.IntervalLog(logger, args.log_every, max_steps, args.global_batch_size, device)
    try:
        for z, y in data.step_batches(dataset, step, max_steps, steps_per_epoch, per_rank, args.global_seed, rank,
                                      world_size, args.num_workers, pin_memory=device.type == "cuda"):
            z, y = z.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # v1.0's linear warm-up from 0 over --warmup-steps, then constant
            lr = args.lr * min(1.0, step / args.warmup_steps) if args.warmup_steps else args.lr
            for group in opt.param_groups:
                group["lr"] = lr
            mask = draw_mask(z, args.mask_schedule)
            y = torch.where(torch.rand(y.shape, device=device) < args.class_dropout_prob, model.num_classes, y)
            with torch.autocast(**autocast):
                loss, logits, token_weight = masked_token_loss(train_model, z, y, mask, model.mask_token,
                                                               args.label_smoothing)
            grad_norm, nonfinite, stop_now = utils.optimizer_step(loss, model.parameters(), opt, scaler,
                                                                  args.grad_clip, stop.requested, device)
            if nonfinite:
                utils.stop_nonfinite(logger, step, ckpt_dir, "Lower --lr, set --grad-clip or use --precision fp32")
            if ema is not None:
                utils.update_ema(ema, model, args.ema_decay)
            step += 1
            # accuracy on the masked tokens of the global batch (not a mean of per-rank accuracies)
            hits = (logits.detach().argmax(-1).view_as(z) == z) & mask
            log.add(step, lr, dict(loss=loss, grad_norm=grad_norm, acc=hits.sum() * token_weight))
            if utils.due(step, args.ckpt_every, max_steps) or stop_now:
                save()
            if utils.due(step, args.sample_every, max_steps):
                grid_model = ema if ema is not None else model
                utils.save_step_grid(lambda path: save_sample_grid(grid_model, ae, meta["class_names"], path, args, device),
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
    data.check_cache_flags(args, world_size, "tokens")
    utils.check_ranges(args, rates=("lr", "grad_clip", "weight_decay", "r_temp", "sm_temp", "cfg_scale"),
                       below_one=("ema_decay", "class_dropout_prob", "label_smoothing", "dropout"),
                       counts=("log_every", "ckpt_every", "num_steps", "grid_rows", "cache_batch_size", "cache_shard_size",
                               "image_size", "epochs", "max_steps"),
                       zero_or_more=("num_workers", "warmup_steps"))
    if args.class_dropout_prob == 0 and args.cfg_scale != 1 and args.sample_every > 0:
        utils.fail(f"--cfg-scale {args.cfg_scale} for the sample grids needs the null class that label dropout trains: "
                   f"--class-dropout-prob 0 leaves it untrained; pass --cfg-scale 1 (or --sample-every 0)")


# ----------------------------------------------------------------------------- flags

# what a resumed run always takes from its checkpoint (anything else given on the command line wins)
FIXED_ON_RESUME = ("model", "dropout", "mask_schedule", "label_smoothing", "class_dropout_prob", "image_size", "flip",
                   "global_seed", "global_batch_size")

PRESETS = {
    # CPU smoke runs and tests: a random tiny VQ model (8x8 tokens, 64 codes), a few steps of MaskGIT-T
    "tiny": dict(vae="scratch:tiny-vq", data_path="builtin:shapes:32", image_size=32, tokens="results/tokens-tiny",
                 model="MaskGIT-T",
                 global_batch_size=4, max_steps=4, warmup_steps=2, log_every=2, ckpt_every=2, sample_every=4, num_steps=4,
                 grid_rows=1, cache_batch_size=8, num_workers=0, results_dir="results"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data: the token cache
    p.add_argument("--tokens", default=None, help="token cache folder; built from --data-path and --vae when it holds none")
    p.add_argument("--data-path", default=None, help="images to cache: a class-folder tree (ImageNet) or builtin:shapes[:N[:SEED]]")
    p.add_argument("--vae", default=None, help="VQ model whose tokens are cached: a name, a path or scratch:CONFIG "
                   "(MaskGIT-pytorch: vq-f16-1024; EQ-VAE: your train_vae.py output); later runs read it from the cache")
    p.add_argument("--image-size", type=int, default=256, help="ADM center crop in pixels (paper: 256, 16x16 tokens)")
    p.add_argument("--cache-batch-size", type=int, default=32, help="images per encoder forward while caching, per process")
    p.add_argument("--cache-shard-size", type=int, default=1000, help="images per cache shard file (each with its flip)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips (the cached flipped copies)")
    p.add_argument("--num-workers", type=int, default=4, help="data loader processes per GPU")
    p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="allow full unpickling of checkpoints you trust "
                   "(taming's VQGAN .ckpt needs it)")
    # model and objective (MaskGIT-pytorch v1.0)
    p.add_argument("--model", choices=list(models.MaskGIT_models), default="MaskGIT-B",
                   help="B: v1.0's 768 wide, 24 blocks, 16 heads (the paper's); L, H: its big and huge; S, T: smaller")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the transformer (0.1)")
    p.add_argument("--mask-schedule", choices=models.MASK_SCHEDULES, default="arccos", help="masking-ratio schedule (arccos)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the cross-entropy (0.1)")
    p.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance (0.1)")
    p.add_argument("--init-from", default=None, help="starting weights: a released name (MaskGIT-B-256) or a checkpoint")
    p.add_argument("--resume", default=None, help="continue a run exactly: a checkpoint, or a run folder (uses latest.pt)")
    # optimisation (v1.0's recipe; the paper: batch 256, 300 epochs)
    p.add_argument("--global-batch-size", type=int, default=256, help="images per step over all processes (256)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate after warm-up, betas (0.9, 0.96) (1e-4)")
    p.add_argument("--warmup-steps", type=int, default=2500, help="linear learning-rate warm-up from 0, in steps (2500)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="AdamW weight decay (1e-5)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables (1.0)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA decay per step; 0 keeps no EMA (v1.0 keeps none)")
    p.add_argument("--epochs", type=int, default=300, help="passes over the cache (300)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None, help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the network (its dropout then draws from inductor's RNG, so a compiled run's "
                        "numbers are not the eager run's)")
    p.add_argument("--global-seed", type=int, default=0, help="seed of initialisation, data order, masks and sample grids")
    # run folder, logging, checkpoints, sample grids
    p.add_argument("--results-dir", default="results", help="parent folder of the run folders")
    p.add_argument("--run-dir", default=None, help="exact run folder (default: a new numbered folder under --results-dir)")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines (averaged over the interval and ranks)")
    p.add_argument("--ckpt-every", type=int, default=50_000, help="steps between checkpoints (plus one at the end)")
    p.add_argument("--sample-every", type=int, default=10_000, help="steps between sample grids (EMA weights when kept); 0 disables")
    p.add_argument("--num-steps", type=int, default=8, help="decoding steps of the grid (MaskGIT: 8)")
    p.add_argument("--sched-mode", choices=models.DECODE_SCHEDULES, default="arccos", help="tokens unmasked per decoding step")
    p.add_argument("--r-temp", type=float, default=4.5, help="Gumbel temperature on the confidences, annealed linearly to 0 (4.5)")
    p.add_argument("--sm-temp", type=float, default=1.0, help="factor on the logits before the softmax, as v1.0 (> 1 sharpens) (1)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale s as DiT's (1 disables), ramped linearly "
                   "from 1 over the steps; v1.0's weight w is s - 1 (its w = 3: 4)")
    p.add_argument("--grid-rows", type=int, default=2, help="samples per class in the grid")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="tiny: CPU smoke run")
    args = p.parse_args(argv)
    if args.preset:
        p.set_defaults(**PRESETS[args.preset])
        args = p.parse_args(argv)  # flags given on the command line still win over the preset
    args.cli_flags = sorted(utils.explicit_flags(p, argv))
    return args


if __name__ == "__main__":
    main(parse_args())
