"""Sampling from a trained DiT/SiT/REPA or MaskGIT (ours or a released one) to a PNG grid or an ADM `.npz`.

Sample i's label and noise depend only on --global-seed and i, so the same N images come out on
any number of processes. Finished chunks are kept in --sample-dir, so an interrupted run resumes;
the end result is DIR/samples.npz (arr_0: uint8 NHWC images, arr_1: labels), which
`evaluate.py gen --sample DIR/samples.npz` scores. Images are made uint8 by rounding
(127.5 x + 128, clamped, then truncated: DiT's conversion).

  CPU smoke:  python sample.py --preset tiny --ckpt results/000-DiT-T-2-diffusion/checkpoints/latest.pt
  one GPU:    python sample.py --ckpt DiT-XL/2-256 --cfg-scale 1.5 --cfg-channels 3 --sample-dir samples/dit-xl
  8 GPUs:     torchrun --nproc_per_node=8 sample.py --ckpt results/003-SiT-XL-2-transport/checkpoints/latest.pt \\
                  --sampler sde --num-steps 250 --num-samples 50000 --sample-dir samples/sit-xl
  REPA:       python sample.py --recipe repa --ckpt REPA-SiT-XL/2-256 --sample-dir samples/repa-xl
  MaskGIT:    python sample.py --ckpt MaskGIT-B-256 --trust-checkpoint --sample-dir samples/maskgit-b
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import diffusion
import models
import utils

# ----------------------------------------------------------------------------- helpers


def labels_for(indices, args, num_classes, noise):
    """Uniform labels from each sample's own stream, or index mod num_classes (--class-balanced)."""
    if args.class_balanced:
        return torch.tensor([i % num_classes for i in indices], device=noise.device)
    return noise.labels(num_classes)


@torch.no_grad()
def sample_batch(model, objective, ae, recipe, indices, y, args, device, autocast):
    """uint8 (N, H, W, 3) images for these sample indices and labels (objective None: MaskGIT)."""
    noise = diffusion.SampleNoise(args.global_seed, indices, device)
    if y is None:
        y = labels_for(indices, args, model.num_classes, noise)
    with torch.autocast(**autocast):
        if objective is None:  # MaskGIT: sample i's draws come from its own generator, after its label
            z = models.maskgit_generate(model, y, noise.generators, args.num_steps, args.sched_mode, args.r_temp,
                                        args.sm_temp, args.cfg_scale)
        else:
            z = diffusion.generate(model, objective, noise, y, args.sampler, args.num_steps, args.cfg_scale,
                                   args.cfg_channels, args.guidance_low, args.guidance_high)
    images = ae.decode_indices(z) if objective is None else ae.decode(data.denormalize_latents(z.float(), recipe["latent"]))
    return models.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy(), y.cpu().numpy()


def chunk_files(folder):
    """{(start, end): path} of the finished chunks in folder."""
    found = {}
    for name in os.listdir(folder):
        match = re.fullmatch(r"chunk-(\d+)-(\d+)\.npz", name)
        if match:
            found[(int(match[1]), int(match[2]))] = os.path.join(folder, name)
    return found


def todo_chunks(num_samples, done, batch_size):
    """Runs of at most batch_size consecutive indices that no finished chunk covers."""
    covered = np.zeros(num_samples, dtype=bool)
    for start, end in done:
        covered[start:end] = True
    chunks, i = [], 0
    while i < num_samples:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < num_samples and not covered[j] and j - i < batch_size:
            j += 1
        chunks.append((i, j))
        i = j
    return chunks


# ----------------------------------------------------------------------------- main


def main(args):
    rank, world_size, device = utils.setup_distributed()
    torch.set_grad_enabled(False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    # the generator and its recipe (architecture, objective, latent normalisation, autoencoder)
    try:
        model, recipe = models.load_generator(args.ckpt, args.model, args.trust_checkpoint, use_ema=args.ema)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        utils.fail(f"--ckpt {args.ckpt}: {str(e).strip(chr(34) + chr(39))}")
    model.to(device).eval()
    maskgit = isinstance(model, models.MaskGIT)
    if maskgit and args.recipe:
        utils.fail(f"--recipe {args.recipe} is a DiT/SiT sampler setting, not for this {recipe['model']}: remove it")
    # flags of the other family would do nothing: refused, not ignored
    foreign = sorted(set(args.cli_flags) & set(DIT_ONLY if maskgit else MASKGIT_ONLY))
    if foreign:
        names = ", ".join("--" + f.replace("_", "-") for f in foreign)
        utils.fail(f"{names} {'is' if len(foreign) == 1 else 'are'} for {'DiT/SiT' if maskgit else 'MaskGIT'} models, "
                   f"not this {recipe['model']}: remove {'it' if len(foreign) == 1 else 'them'}")
    args.num_steps = args.num_steps or (8 if maskgit else 250)  # MaskGIT: 8 steps; DiT and SiT: 250
    if args.cfg_scale is None:  # MaskGIT-pytorch's FID setting w = 3; the paper's DiT/SiT tables: no guidance
        args.cfg_scale = 4.0 if maskgit else 1.0
    if maskgit:
        objective = None
        try:
            models.unmask_schedule(model.num_tokens, args.num_steps, args.sched_mode)
        except ValueError as e:
            utils.fail(f"--num-steps {args.num_steps}: {e}")
    else:
        objective = diffusion.make_objective(recipe["objective"], model)
        args.sampler = args.sampler or diffusion.default_sampler(recipe["objective"])
        if (recipe["objective"]["kind"] == "diffusion") != (args.sampler in ("ddpm", "ddim")):
            utils.fail(f"--sampler {args.sampler} does not fit this {recipe['objective']['kind']} model "
                       f"(diffusion: ddpm, ddim; transport: euler, heun, sde)")
        if recipe["objective"]["kind"] == "diffusion" and not 2 <= args.num_steps <= objective.num_timesteps:
            utils.fail(f"--num-steps {args.num_steps}: the diffusion samplers take 2 to the model's "
                       f"{objective.num_timesteps} training timesteps (one respaced step is t = 0 on pure noise)")
    if not maskgit and args.cfg_channels and args.cfg_channels > model.in_channels:  # more would guide the variance
        utils.fail(f"--cfg-channels {args.cfg_channels}: this {recipe['model']} has {model.in_channels} latent channels")
    untrained_null = (recipe.get("class_dropout_prob") == 0 if maskgit else
                      model.y_embedder.embedding_table.num_embeddings <= model.num_classes)
    if args.cfg_scale != 1 and untrained_null:
        utils.fail(f"--cfg-scale {args.cfg_scale}: this {recipe['model']} was trained without label dropout, so it has "
                   f"no null class to guide with: pass --cfg-scale 1")
    if args.class_labels and any(not 0 <= c < model.num_classes for c in args.class_labels):
        utils.fail(f"--class-labels must lie in [0, {model.num_classes - 1}]")
    coder = recipe["tokens"] if maskgit else recipe["latent"]  # the autoencoder the model was trained on
    vae = args.vae or coder["vae"]
    try:  # the recorded weights are checked; --vae may decode with others on purpose (DiT: ft-ema or ft-mse)
        ae = data.coder_of(coder, args.vae, args.trust_checkpoint, check_hash=args.vae is None).to(device)
    except ValueError as e:
        utils.fail(f"--vae {e}" if args.vae else f"the autoencoder recorded with the model: {e}; pass --vae")
    # what the model draws must be what the autoencoder decodes, before anything is written
    if maskgit and (ae.kind != "vq" or ae.quantize.n_embed != coder["codebook_size"]):
        utils.fail(f"--vae {vae}: this {recipe['model']} draws tokens of a {coder['codebook_size']}-code VQ model, "
                   f"which {vae} is not")
    if not maskgit and (ae.kind != "kl" or ae.latent_channels != model.in_channels):
        utils.fail(f"--vae {vae}: this {recipe['model']} draws {model.in_channels}-channel latents of a continuous "
                   f"(KL) autoencoder, which {vae} is not")
    if rank == 0:
        os.makedirs(args.sample_dir, exist_ok=True)
    utils.barrier()
    settings = dict(ckpt=args.ckpt, ema=args.ema, vae=vae, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                    global_seed=args.global_seed, precision=args.precision)
    if maskgit:
        settings.update(sched_mode=args.sched_mode, r_temp=args.r_temp, sm_temp=args.sm_temp)
        utils.print0(f"{recipe['model']} from {args.ckpt}, {args.num_steps} {args.sched_mode} steps, cfg {args.cfg_scale} "
                     f"(ramped from 1), Gumbel temperature {args.r_temp}, softmax factor {args.sm_temp}; decoding with "
                     f"{vae}; {world_size} process(es)")
    else:
        settings.update(sampler=args.sampler, cfg_channels=args.cfg_channels, guidance_low=args.guidance_low,
                        guidance_high=args.guidance_high)
        utils.print0(f"{recipe['model']} ({recipe['objective']['kind']}) from {args.ckpt}, {args.sampler} {args.num_steps} "
                     f"steps, cfg {args.cfg_scale}" + (f" on {args.cfg_channels} channels" if args.cfg_channels else "")
                     + (f", guidance interval [{args.guidance_low}, {args.guidance_high}]" if args.cfg_scale != 1 else "")
                     + f"; decoding with {vae}; {world_size} process(es)")

    # a grid of chosen classes (DiT's sample.py), one column per label
    if args.class_labels:
        columns = []
        for c in args.class_labels:
            indices = [c * args.grid_rows + r for r in range(args.grid_rows)]
            images, _ = sample_batch(model, objective, ae, recipe, indices, torch.full((len(indices),), c, device=device),
                                     args, device, autocast)
            columns.append(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        path = os.path.join(args.sample_dir, "grid.png")
        if rank == 0:
            names = recipe.get("class_names") or [str(c) for c in range(model.num_classes)]
            utils.save_labelled_grid(columns, [names[c] for c in args.class_labels], path)
            print(f"saved {path}", flush=True)
        utils.cleanup()
        return path

    # N samples in chunks spread over the ranks; finished chunks are kept (resumable)
    settings_path = os.path.join(args.sample_dir, "settings.json")
    out_path = os.path.join(args.sample_dir, "samples.npz")
    problem = None
    if rank == 0:
        # the weights themselves, not only the path: checkpoints/latest.pt changes while a run trains
        settings.update(num_samples=args.num_samples, class_balanced=args.class_balanced, weights_hash=data.weights_hash(model))
        has_samples = bool(chunk_files(args.sample_dir)) or os.path.isfile(out_path)
        if has_samples and os.path.isfile(settings_path):
            with open(settings_path) as f:
                previous = json.load(f)
            diffs = [f"{k}: {previous.get(k)!r} there, {v!r} now" for k, v in settings.items() if previous.get(k) != v]
            if diffs:
                problem = (f"--sample-dir {args.sample_dir} holds samples made with other settings ({'; '.join(diffs)}): "
                           f"choose another --sample-dir")
        elif has_samples:  # made by whom, with what?
            problem = (f"--sample-dir {args.sample_dir} holds samples but no settings.json to tell how they were made: "
                       f"choose another --sample-dir")
        else:  # no sample yet (a first attempt may have failed before its first chunk): these settings
            utils.write_json(settings_path, settings)
    # every rank stops on rank 0's finding (one error line, not the others' broken-collective tracebacks)
    if utils.broadcast_object(problem):
        utils.cleanup(sync=False)
        if rank == 0:
            utils.fail(problem)
        sys.exit(2)
    if not os.path.isfile(out_path):
        # rank 0 lists what is left for all: a rank listing later could see a chunk another already wrote
        chunks = utils.broadcast_object(todo_chunks(args.num_samples, chunk_files(args.sample_dir), args.per_proc_batch_size)
                                        if rank == 0 else None)
        mine = chunks[rank::world_size]
        for start, end in tqdm(mine, desc="sampling", disable=rank != 0):
            images, labels = sample_batch(model, objective, ae, recipe, list(range(start, end)), None, args, device, autocast)
            tmp = os.path.join(args.sample_dir, f".chunk-{start:07d}-{end:07d}.tmp.npz")
            np.savez(tmp, arr_0=images, arr_1=labels)
            os.replace(tmp, os.path.join(args.sample_dir, f"chunk-{start:07d}-{end:07d}.npz"))
        utils.barrier()
        if rank == 0:
            done = sorted(chunk_files(args.sample_dir).items())
            if todo_chunks(args.num_samples, [k for k, _ in done], args.num_samples):
                utils.fail(f"{args.sample_dir}: some samples are missing after sampling; run the command again to finish")
            images, labels = [], []
            for _, path in done:  # one chunk open at a time: 50,000 samples are 1,563 chunks of 32
                with np.load(path) as chunk:
                    images.append(chunk["arr_0"])
                    labels.append(chunk["arr_1"])
            images, labels = np.concatenate(images), np.concatenate(labels)
            tmp = out_path + ".tmp.npz"
            np.savez(tmp, arr_0=images, arr_1=labels)
            os.replace(tmp, out_path)
            for _, path in done:
                os.remove(path)
            preview = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 255
            from torchvision.utils import save_image

            save_image(preview, os.path.join(args.sample_dir, "preview.png"), nrow=8, padding=2, pad_value=1.0)
    if rank == 0:
        print(f"{args.num_samples} samples in {out_path} (preview: {args.sample_dir}/preview.png)\nscore them with:\n"
              f"  python evaluate.py gen --ref VIRTUAL_imagenet256_labeled.npz --sample {out_path}", flush=True)
    # no barrier: the ranks met after sampling, and rank 0 alone may take minutes writing 50k images
    utils.cleanup(sync=False)
    return out_path


# ----------------------------------------------------------------------------- flags

# flags of one family of models; given for the other they are refused
DIT_ONLY = ("sampler", "cfg_channels", "guidance_low", "guidance_high")
MASKGIT_ONLY = ("sched_mode", "r_temp", "sm_temp")
# sizes (--preset) and published sampler settings (--recipe) are separate flags, so they combine
PRESETS = {
    "tiny": dict(num_samples=8, per_proc_batch_size=4, num_steps=4, sample_dir="results/samples-tiny"),
}
RECIPES = {
    # REPA's FID setting (SDE, 250 steps, CFG 1.8 with the guidance interval up to 0.7)
    "repa": dict(sampler="sde", num_steps=250, cfg_scale=1.8, guidance_high=0.7),
    # its ODE setting: generate.py --mode ode --heun (50 steps; Heun's correction on all but the last)
    "repa-ode": dict(sampler="heun", num_steps=50, cfg_scale=1.8, guidance_high=0.7),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the model
    p.add_argument("--ckpt", required=True, help="a train_dit.py or train_maskgit.py checkpoint, a released name ("
                   + ", ".join([*models.PRETRAINED_GENERATORS, *models.PRETRAINED_MASKGIT])
                   + "), or an official DiT/SiT/REPA .pt or MaskGIT-pytorch .pth (with --model)")
    p.add_argument("--model", choices=list(models.DiT_models) + list(models.SiT_models) + list(models.MaskGIT_models),
                   default=None, help="architecture of an official .pt/.pth file (ours and the released names carry it)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="our checkpoints: EMA weights (default; the raw ones of a run that kept no EMA) or raw")
    p.add_argument("--vae", default=None, help="decoder (default: the autoencoder recorded with the model)")
    p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="allow full unpickling of checkpoints you trust")
    # the sampler
    p.add_argument("--sampler", choices=diffusion.SAMPLERS, default=None,
                   help="ddpm (DiT's), ddim: diffusion models; euler, heun (ODE), sde (Euler-Maruyama, SiT's FID setting): "
                        "transport models (default: ddpm or sde)")
    p.add_argument("--num-steps", type=int, default=None, help="sampling steps (DiT and SiT: 250; MaskGIT: 8)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale; 1 disables (default: 1, the paper's DiT/SiT tables; MaskGIT: 4, "
                        "MaskGIT-pytorch's w = 3 written as a scale, w = s - 1, ramped linearly from 1 over the steps)")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N latent channels; 3 reproduces the official DiT/SiT numbers (default: all)")
    p.add_argument("--guidance-low", type=float, default=0.0, help="guidance interval start, t in [0, 1] with 1 = noise")
    p.add_argument("--guidance-high", type=float, default=1.0, help="guidance interval end (REPA's FID setting: 0.7)")
    # MaskGIT's decoding (MaskGIT-pytorch v1.0's FID setting)
    p.add_argument("--sched-mode", choices=models.DECODE_SCHEDULES, default="arccos", help="MaskGIT: tokens unmasked per step (arccos)")
    p.add_argument("--r-temp", type=float, default=4.5, help="MaskGIT: Gumbel temperature on the confidences, annealed "
                   "linearly to 0 (4.5)")
    p.add_argument("--sm-temp", type=float, default=1.0, help="MaskGIT: factor on the logits before the softmax, as "
                   "MaskGIT-pytorch (> 1 sharpens; its FID setting: 1)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="network precision (the official numbers: fp32)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPU (DiT's default)")
    # what to produce
    p.add_argument("--num-samples", type=int, default=50_000, help="images in samples.npz (the ADM protocol: 50000)")
    p.add_argument("--class-balanced", action=argparse.BooleanOptionalAction, default=False,
                   help="label i = i mod num_classes (N / num_classes per class) instead of uniform random labels")
    p.add_argument("--class-labels", type=int, nargs="+", default=None, help="only a labelled grid of these classes (no .npz)")
    p.add_argument("--grid-rows", type=int, default=1, help="samples per class in the --class-labels grid")
    p.add_argument("--per-proc-batch-size", type=int, default=32, help="images per forward, per process")
    p.add_argument("--global-seed", type=int, default=0, help="seed: sample i's label and noise depend on it and i only")
    p.add_argument("--sample-dir", default="samples", help="output folder (samples.npz, preview.png, grid.png)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="tiny: CPU smoke run (8 samples, 4 steps)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="repa: REPA's FID setting (SDE, 250 steps, CFG 1.8 in the interval [0, 0.7]); "
                        "repa-ode: its ODE setting (Heun, 50 steps, same guidance); combines with --preset "
                        "(the preset's step count wins)")
    args = p.parse_args(argv)
    if args.preset or args.recipe:
        p.set_defaults(**{**RECIPES.get(args.recipe, {}), **PRESETS.get(args.preset, {})})
        args = p.parse_args(argv)  # flags given on the command line still win over both
    for flag in ("num_samples", "per_proc_batch_size", "num_steps", "grid_rows", "cfg_channels"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer")
    for flag in ("r_temp", "sm_temp", "cfg_scale"):
        if getattr(args, flag) is not None and not 0 <= getattr(args, flag) < float("inf"):
            p.error(f"--{flag.replace('_', '-')} must be a finite number, 0 or more")
    if not 0 <= args.global_seed < 1 << 32:  # sample i's stream is seeded with seed x 1,000,003 + i (int64)
        p.error(f"--global-seed {args.global_seed}: give a seed in [0, 2^32)")
    if args.sm_temp is not None and args.sm_temp == 0:
        p.error("--sm-temp 0 makes every code equally likely (uniform noise); large values approach greedy decoding")
    args.cli_flags = sorted(utils.explicit_flags(p, argv))
    blocked = utils.unwritable_ancestor(args.sample_dir)
    if blocked:
        p.error(f"--sample-dir {args.sample_dir}: {blocked} is not a writable folder")
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        p.error("the guidance interval needs 0 <= --guidance-low <= --guidance-high <= 1")
    return args


if __name__ == "__main__":
    main(parse_args())
