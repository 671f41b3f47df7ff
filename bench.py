"""Throughput benchmarks of every stage: one function per entry of BENCHMARKS, each returning a
dict of numbers; one line per benchmark on stdout, all of them as JSON with --out.

CPU tiny smoke:
    python bench.py --only inception --preset tiny
One GPU:
    python bench.py --device cuda --out bench-h100.json
torchrun: not used; every benchmark is one process (multi-GPU throughput is per-GPU throughput times N).

Timings drift between runs on shared machines: compare ratios measured in the same run, where
the contenders are timed interleaved (best of N rounds).
"""
import argparse
import time
from unittest import mock

import numpy as np
import torch

from utils import write_json

# ----------------------------------------------------------------------------- helpers


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns, device, repeats, warmup=1):
    """Best-of-`repeats` seconds per call of each fn in `fns` (name -> callable), timed round-robin
    so that drifting machine load hits every contender alike; the minimum, because on a shared
    machine the noise only ever adds time."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def _max_rel_err(out, ref):
    """max |out - ref| / max |ref| over each feature kind, the worst kind."""
    return max(((out[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)


# ----------------------------------------------------------------------------- benchmarks


def bench_inception(args):
    """FID Inception feature extraction from uint8 256x256 images (what evaluate.py gen does per
    batch: resize to 299, normalise, forward): ours (TF1 resize, folded batch norm, channels_last)
    against pytorch-fid's InceptionV3 (FID variant, same random weights, its F.interpolate resize),
    interleaved, fed NCHW as pytorch-fid itself does and, for reference, channels_last. Then our
    precision variants (bf16; on CUDA also tf32) with their largest relative error against our fp32
    features (pool, spatial, logits); evaluate.py keeps fp32 unless that error is under 1e-3."""
    import evaluate as ev

    device = torch.device(args.device)
    tiny = args.preset == "tiny"
    batch = 4 if tiny else (64 if device.type == "cuda" else 16)
    repeats = 7 if tiny else 10
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(batch, 256, 256, 3), dtype=np.uint8))
    if device.type == "cuda":
        images = images.pin_memory()

    ours = ev.load_inception("random", device)
    result = {"batch": batch, "device": str(device), "threads": torch.get_num_threads()}
    contenders = {"ours": lambda: ev.inception_features(ours, images)}
    try:
        import pytorch_fid.inception as pfi
    except ImportError:  # a test dependency; without it only our numbers are reported
        pfi = None
    if pfi is not None:
        state = ev.random_inception_weights(0)
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
            theirs = pfi.InceptionV3([3]).to(device).eval()

        @torch.inference_mode()
        def run_theirs(memory_format):
            x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0  # its input: [0, 1]
            return theirs(x.contiguous(memory_format=memory_format))[0]

        # as pytorch-fid runs (ToTensor gives NCHW), and fed channels_last, which its convs then follow
        contenders["pytorch_fid"] = lambda: run_theirs(torch.contiguous_format)
        contenders["pytorch_fid_channels_last"] = lambda: run_theirs(torch.channels_last)
    with ev._precision_context("fp32", device):  # pytorch-fid's convs must not get TF32 either
        seconds = _interleaved(contenders, device, repeats)
    for name, s in seconds.items():
        result[f"{name}_img_s"] = batch / s
    if "pytorch_fid" in seconds:
        result["speedup_vs_pytorch_fid"] = seconds["pytorch_fid"] / seconds["ours"]
        result["speedup_vs_pytorch_fid_channels_last"] = seconds["pytorch_fid_channels_last"] / seconds["ours"]

    # precision variants: speed and the largest relative error of pool/spatial/logits against fp32
    reference = ev.inception_features(ours, images)
    variants = ["bf16"] + (["tf32"] if device.type == "cuda" else [])
    models = {}
    for precision in variants:
        models[precision] = ev.load_inception("random", device, precision)
        result[f"{precision}_max_rel_err"] = _max_rel_err(ev.inception_features(models[precision], images), reference)
    seconds = _interleaved({p: (lambda m=m: ev.inception_features(m, images)) for p, m in models.items()}, device, repeats)
    for precision, s in seconds.items():
        result[f"{precision}_img_s"] = batch / s
    return result


def bench_train_vae(args):
    """One EQ-VAE training step (an EQ step: tau drawn as in training; LPIPS-VGG, PatchGAN with the
    adaptive weight, both optimizer updates) for each precision, interleaved. GPU: the paper's
    kl-f8 at 256 px, batch 10 per GPU; CPU: kl-f8 at 128 px, batch 2; --preset tiny: scratch:tiny."""
    import random

    import models as M
    import train_vae

    device = torch.device(args.device)
    if args.preset == "tiny":
        config, size, batch, repeats = M.AE_configs["tiny"], 64, 2, 2
    elif device.type == "cuda":
        config, size, batch, repeats = M.AE_configs["kl-f8"], 256, 10, 5
    else:
        config, size, batch, repeats = M.AE_configs["kl-f8"], 128, 2, 2
    torch.manual_seed(0)
    lpips_net = M.load_lpips(random_backbone=True).to(device)  # same FLOPs as the pretrained one
    loss_args = argparse.Namespace(perceptual_weight=1.0, kl_weight=1e-6, codebook_weight=1.0, disc_weight=0.5, disc_factor=1.0)
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    lat = size // (2 ** (len(config["ch_mult"]) - 1))
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    steps = {}
    for precision in precisions:
        ae = M.build_autoencoder(config).to(device).train()
        disc = M.NLayerDiscriminator(n_layers=3 if size >= 128 else 2).to(device).train()
        logvar = torch.nn.Parameter(torch.zeros((), device=device))
        opt_ae = torch.optim.Adam(list(ae.parameters()) + [logvar], lr=1e-5, betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.5, 0.9))
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        rng = random.Random(0)

        def step(ae=ae, disc=disc, logvar=logvar, opt_ae=opt_ae, opt_d=opt_d, scaler=scaler, dtype=dtype, rng=rng,
                 precision=precision):
            tau = M.sample_eq_transform(lat, lat, "rotation+scale", rng=rng)
            with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
                target, rec, reg = train_vae.forward_step(ae, x, tau, "bicubic", False)
                disc.requires_grad_(False)
                loss, _ = train_vae.generator_loss("kl", target, rec, reg, logvar, lpips_net, disc, loss_args, True, ae.last_layer())
                disc.requires_grad_(True)
            scaler.scale(loss).backward()
            with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
                d_loss = train_vae.hinge_d_loss(disc(target.detach()), disc(rec.detach()))
            scaler.scale(d_loss).backward()
            for opt in (opt_ae, opt_d):
                scaler.step(opt)
                opt.zero_grad(set_to_none=True)
            scaler.update()

        steps[precision] = step
    seconds = _interleaved(steps, device, repeats)
    result = {"model": "tiny" if args.preset == "tiny" else "kl-f8", "image_size": size, "batch": batch, "device": str(device)}
    for precision, s in seconds.items():
        result[f"{precision}_img_s"] = batch / s
        result[f"{precision}_speedup_vs_fp32"] = seconds["fp32"] / s
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


BENCHMARKS = {"inception": bench_inception, "train_vae": bench_train_vae}

# ----------------------------------------------------------------------------- main


def main(args):
    results = {}
    for name in args.only or list(BENCHMARKS):
        t0 = time.time()
        results[name] = BENCHMARKS[name](args)
        line = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results[name].items())
        print(f"{name}: {line} ({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        write_json(args.out, {"torch": torch.__version__, "device": args.device, "preset": args.preset, "results": results})
        print(f"wrote {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="throughput benchmarks of every stage")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None, help="benchmarks to run (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available)")
    parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: small batches and few repeats (CPU smoke runs)")
    parser.add_argument("--out", default=None, help="JSON file for all results")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
