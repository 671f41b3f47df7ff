"""Throughput benchmarks of every stage: one function per entry of BENCHMARKS, each returning a
dict of numbers; one line per benchmark on stdout, all of them as JSON with --out.

CPU tiny smoke:
    python bench.py --only inception train_dit train_repa sample_dit train_maskgit sample_maskgit --preset tiny
Against the official DiT code (a clone of it on this machine; never vendored here):
    python bench.py --only train_dit --official-dit ~/src/DiT
One GPU:
    python bench.py --device cuda --out bench-h100.json
torchrun: not used; every benchmark is one process (multi-GPU throughput is per-GPU throughput times N).

Timings drift between runs on shared machines: compare ratios measured in the same run, where
the contenders are timed interleaved (best of N rounds). On CUDA, "tf32" names full precision as
the scripts run it (TF32 matmuls and convolutions); on CPU it is "fp32". A benchmark that fails
prints its traceback and the others still run (one GPU window is precious); the exit code is 1.
"""
import argparse
import gc
import importlib.util
import os
import sys
import time
import traceback
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


def _full_precision(device):
    """The name of full precision on this device: the trainers and sample.py allow TF32 on CUDA."""
    return "tf32" if device.type == "cuda" else "fp32"


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
    repeats = 1 if tiny else 10
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
    """EQ-VAE training steps (EQ steps: LPIPS-VGG, PatchGAN with the adaptive weight, both optimizer
    updates) through the trainer's own objective (train_vae.eq_vae_objective) and optimizers, per
    precision, interleaved. One timed call is a fixed sequence of steps whose tau are drawn as in
    training from the same seed every call, so every contender sees the same shapes and the counted
    FLOPs fit every call. Contenders: full precision, bf16 autocast, bf16 with channels_last
    activations and weights, and on CUDA fp16 with its scaler; on CUDA also a second round with
    cudnn.benchmark (tuned once per tau shape in the warm-up), and the ten costliest kernels of a bf16
    call (torch.profiler). GPU: the paper's kl-f8 at 256 px, batch 10 per GPU; CPU: kl-f8 at 128 px,
    batch 2; --preset tiny: scratch:tiny at 64 px."""
    import random

    import models as M
    import train_vae

    device = torch.device(args.device)
    if args.preset == "tiny":
        config, size, batch, repeats, steps_per_call = M.AE_configs["tiny"], 64, 2, 1, 1
    elif device.type == "cuda":
        config, size, batch, repeats, steps_per_call = M.AE_configs["kl-f8"], 256, 10, 5, 4
    else:
        config, size, batch, repeats, steps_per_call = M.AE_configs["kl-f8"], 128, 2, 2, 4
    # the trainer's defaults (the paper's recipe), every step an EQ step, the discriminator on
    vae_args = train_vae.parse_args(["--data-path", "builtin:shapes", "--image-size", str(size), "--eq-prob", "1",
                                     "--disc-start", "0", "--disc-layers", "3" if size >= 128 else "2"])
    train_vae.resolve_kind_defaults(vae_args, "kl")
    torch.manual_seed(0)
    lpips_net = M.load_lpips(random_backbone=True).to(device)  # same FLOPs as the pretrained one
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    logvar = torch.zeros((), device=device)  # LDM's fixed log-variance: not optimised, as in the trainer
    full = _full_precision(device)
    precisions = [full, "bf16", "bf16_channels_last"] + (["fp16"] if device.type == "cuda" else [])
    calls = {}
    for precision in precisions:
        memory_format = torch.channels_last if precision.endswith("channels_last") else torch.contiguous_format
        ae = M.build_autoencoder(config).to(device, memory_format=memory_format).train()
        disc = M.NLayerDiscriminator(n_layers=vae_args.disc_layers).to(device, memory_format=memory_format).train()
        opt_ae, opt_d = train_vae.build_optimizers(ae, disc, lr=1e-5)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.split("_")[0], torch.float32)
        images = x.contiguous(memory_format=memory_format)

        def call(ae=ae, disc=disc, opt_ae=opt_ae, opt_d=opt_d, scaler=scaler, dtype=dtype, images=images):
            rng = random.Random(0)  # the same tau sequence every call
            for _ in range(steps_per_call):
                loss_scale = scaler.get_scale() if scaler.is_enabled() else 1.0
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss, d_loss, _, _ = train_vae.eq_vae_objective(ae, disc, images, 0, rng, vae_args, logvar,
                                                                     lpips_net, loss_scale)
                scaler.scale(loss).backward()
                scaler.scale(d_loss).backward()
                for opt in (opt_ae, opt_d):
                    scaler.step(opt)
                    opt.zero_grad(set_to_none=True)
                scaler.update()

        calls[precision] = call
    flops = _count_flops(calls[full])
    seconds = _interleaved(calls, device, repeats)
    if device.type == "cuda":  # cuDNN's autotuner, once per shape of the call's tau sequence (the warm-up)
        torch.backends.cudnn.benchmark = True
        tuned = _interleaved({f"{p}_cudnn_benchmark": calls[p] for p in (full, "bf16", "bf16_channels_last")}, device, repeats)
        torch.backends.cudnn.benchmark = False
        seconds.update(tuned)
    images_per_call = batch * steps_per_call
    result = {"model": "tiny" if args.preset == "tiny" else "kl-f8", "image_size": size, "batch": batch,
              "steps_per_call": steps_per_call, "train_tflop_per_step": flops / steps_per_call / 1e12}
    peaks = _measured_peaks(device, result)
    for key, s in seconds.items():
        result[f"{key}_img_s"] = images_per_call / s
        if key != full:
            result[f"{key}_speedup_vs_{full}"] = seconds[full] / s
        _add_mfu(result, key, flops, s, peaks, device)
    if device.type == "cuda":
        try:  # a profiler problem must not cost the timings above
            result["bf16_top_kernels"] = _top_kernels(calls["bf16"], device)
        except Exception as e:
            result["bf16_top_kernels"] = f"profiler failed: {type(e).__name__}: {e}"
    return result


def _top_kernels(fn, device, count=10):
    """The `count` kernels with the most self time in one call of fn: 'name ms; ...' (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        _sync(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)[:count]
    return "; ".join(f"{e.key} {getattr(e, attribute) / 1e3:.1f} ms" for e in events)


def _load_official_dit(folder):
    """The official DiT code from a local clone (--official-dit), imported under other names so
    that it does not shadow our models.py and diffusion.py. Needs timm."""

    def load(name, path, package_dir=None):
        spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package_dir)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    official_models = load("official_dit_models", os.path.join(folder, "models.py"))
    official_diffusion = load("official_dit_diffusion", os.path.join(folder, "diffusion", "__init__.py"),
                              [os.path.join(folder, "diffusion")])
    return official_models, official_diffusion


def _peak_matmul_flops(device, dtype, size=None, repeats=5):
    """Measured FLOP/s of a large square matmul (TF32 on CUDA for float32, as the benchmarks run): the
    attainable peak MFU is quoted against here (on CPUs no datasheet number fits the machine a run
    lands on). On GPU ten back-to-back matmuls per timing, so launch and sync overhead stay out."""
    size = size or (8192 if device.type == "cuda" else 2048)
    count = 10 if device.type == "cuda" else 1
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def matmuls():
        for _ in range(count):
            a @ b

    seconds = _interleaved({"mm": matmuls}, device, repeats)["mm"]
    return count * 2 * size**3 / seconds


# dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity); the more specific
# names first, since the SXM parts report only "H100 80GB HBM3" or "H200"
DATASHEET_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H100", 989), ("H200", 989),
                         ("A100", 312))


def _datasheet_bf16_tflops(device):
    """The datasheet's dense bf16 peak of this GPU, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for part, tflops in DATASHEET_BF16_TFLOPS if part in name), None)


def _native_bf16(device):
    """Whether this device computes bf16 in hardware: CUDA GPUs do; on CPU, oneDNN's bf16 kernels
    need AVX-512. An AVX2-only CPU (many AMD EPYCs) emulates bf16, 10 to 100 times slower than fp32."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _cpu_name():
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown"


def _add_mfu(result, key, flops, seconds, peaks, device):
    """MFU of contender `key` (counted FLOPs per call / seconds per call) against the measured matmul
    peak of its precision, and for bf16 on a known GPU against the datasheet peak. Emulated bf16 has
    no meaningful peak: its contenders get no MFU (their images/s stand)."""
    precision = "bf16" if "bf16" in key else _full_precision(device)
    if precision not in peaks:
        return
    result[f"{key}_mfu_vs_measured_peak"] = flops / seconds / peaks[precision]
    datasheet = _datasheet_bf16_tflops(device)
    if precision == "bf16" and datasheet:
        result[f"{key}_mfu_vs_datasheet"] = flops / seconds / (datasheet * 1e12)


def _measured_peaks(device, result):
    """Measured matmul peaks of full precision and bf16 (FLOP/s), also recorded in `result` in TFLOP/s.
    Without hardware bf16 only the full-precision peak is measured (an emulated 2048^3 bf16 matmul
    takes a minute), and `result` says why bf16 has none."""
    peaks = {_full_precision(device): _peak_matmul_flops(device, torch.float32)}
    if _native_bf16(device):
        peaks["bf16"] = _peak_matmul_flops(device, torch.bfloat16)
    else:
        result["bf16_note"] = "this CPU has no hardware bf16 (no AVX-512): bf16 is emulated, and has no MFU"
    for precision, flops in peaks.items():
        result[f"measured_peak_tflops_{precision}"] = flops / 1e12
    datasheet = _datasheet_bf16_tflops(device)
    if datasheet:
        result["datasheet_peak_tflops_bf16"] = datasheet
    return peaks


def _count_flops(fn):
    """FLOPs of one call, counted by PyTorch's dispatcher (matmuls, convolutions, attention). Attention
    runs on the math kernel while counting: the counter has no formula for CPU's fused kernel (it
    would count 0), and the math kernel's count equals the fused kernels' on GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def bench_train_dit(args):
    """One DiT training step as train_dit.py takes it (DDPM loss with learned sigma, backward,
    gradient norm and NaN check, AdamW, EMA) and one SiT step (linear velocity loss), full precision
    and bf16 autocast, interleaved with the official DiT code's full-precision step when --official-dit
    points at a clone of it (its own model and diffusion code, initialised by itself, same data).
    With --compile (the default on a GPU) a third DiT contender takes the bf16 step through
    torch.compile as `train_dit.py --compile` does; its first call, the compilation, is recorded apart.
    FLOPs are counted on the real step; MFU is against the measured peak of a large matmul and, on a
    GPU in DATASHEET_BF16_TFLOPS, its datasheet bf16 peak. CPU: DiT-S/2 at 4x32x32, batch 8; GPU:
    DiT-XL/2 at 4x32x32 (256 px), batch 32; --preset tiny: DiT-T/2 at 4x8x8, batch 8."""
    import copy

    import diffusion as D
    import models as M
    import utils as U

    device = torch.device(args.device)
    if args.preset == "tiny":
        name, size, batch, repeats = "T/2", 8, 8, 1
    elif device.type == "cuda":
        name, size, batch, repeats = "XL/2", 32, 32, 10
    else:
        name, size, batch, repeats = "S/2", 32, 8, 5
    full = _full_precision(device)
    torch.manual_seed(0)
    x = torch.randn(batch, 4, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    steps, flops = {}, {}
    no_scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 and fp32 train without one
    contenders = [("DiT", full, False), ("DiT", "bf16", False), ("SiT", "bf16", False)]
    if args.compile:
        contenders.append(("DiT", "bf16", True))
    compile_seconds = None
    for family, precision, compiled in contenders:
        model = M.build_generator(f"{family}-{name}", input_size=size).to(device).train()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)
        objective = D.make_objective(dict(kind="diffusion") if family == "DiT" else
                                     dict(kind="transport", path="linear", prediction="velocity", time_input="sit"), model)
        train_model = torch.compile(model) if compiled else model  # what train_dit.py --compile trains

        def step(model=model, train_model=train_model, ema=ema, opt=opt, objective=objective, precision=precision):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = objective.training_losses(train_model, x, y)["loss"].mean()
            U.optimizer_step(loss, model.parameters(), opt, no_scaler, 0.0, False, device)  # train_dit.py's step
            U.update_ema(ema, model, 0.9999)

        key = f"{family.lower()}_{precision}" + ("_compiled" if compiled else "")
        steps[key] = step
        # counted on the eager model: compilation fuses kernels but does not change the step's FLOPs
        flops[key] = _count_flops(lambda model=model, objective=objective: objective.training_losses(model, x, y)["loss"].mean().backward())
        if compiled:  # the compilation happens in the first call: timed here, kept out of the step's time
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            compile_seconds = time.perf_counter() - t0
    if args.official_dit:
        official_models, official_diffusion = _load_official_dit(args.official_dit)
        theirs = official_models.DiT_models[f"DiT-{name}"](input_size=size).to(device).train()
        theirs_ema = copy.deepcopy(theirs).requires_grad_(False)
        theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0)  # DiT's optimizer
        theirs_diffusion = official_diffusion.create_diffusion(timestep_respacing="")

        def official_step():
            t = torch.randint(0, theirs_diffusion.num_timesteps, (batch,), device=device)
            loss = theirs_diffusion.training_losses(theirs, x, t, dict(y=y))["loss"].mean()
            theirs_opt.zero_grad()
            loss.backward()
            theirs_opt.step()
            with torch.no_grad():  # DiT's EMA: ema = decay * ema + (1 - decay) * param
                for (_, e), (_, p) in zip(theirs_ema.named_parameters(), theirs.named_parameters()):
                    e.mul_(0.9999).add_(p.data, alpha=1e-4)

        steps[f"official_dit_{full}"] = official_step
    seconds = _interleaved(steps, device, repeats)
    result = {"model": f"DiT-{name}", "latent": f"4x{size}x{size}", "batch": batch,
              "train_tflop_per_step": flops[f"dit_{full}"] / 1e12}
    if compile_seconds is not None:
        result["dit_bf16_compiled_first_call_s"] = compile_seconds
    peaks = _measured_peaks(device, result)
    for key, s in seconds.items():
        result[f"{key}_img_s"] = batch / s
        if key in flops:
            _add_mfu(result, key, flops[key], s, peaks, device)
    if f"official_dit_{full}" in seconds:
        for key in [k for k in (f"dit_{full}", "dit_bf16", "dit_bf16_compiled") if k in seconds]:
            result[f"{key}_speedup_vs_official"] = seconds[f"official_dit_{full}"] / seconds[key]
    return result


def bench_train_repa(args):
    """One REPA training step (the encoder's forward on uint8 images without gradients, the SiT
    with projectors, interpolant + 0.5 x alignment loss, backward, AdamW with clipping, EMA) next to
    the plain SiT step, full precision and bf16 autocast. FLOPs (encoder included) counted on the real
    step; MFU as bench_train_dit. Random weights (speed does
    not depend on them). CPU: SiT-S/2 at 4x32x32 with DINOv2-B/14 on 256-px images, batch 8; GPU:
    SiT-XL/2 with DINOv2-B/14, batch 32; --preset tiny: SiT-T/2 at 4x8x8 with ViT-S/14 on 32-px images."""
    import copy

    import diffusion as D
    import models as M
    import utils as U

    device = torch.device(args.device)
    if args.preset == "tiny":
        name, size, image_size, encoder_name, batch, repeats = "T/2", 8, 32, "dinov2_vits14", 8, 1
    elif device.type == "cuda":
        name, size, image_size, encoder_name, batch, repeats = "XL/2", 32, 256, "dinov2_vitb14", 32, 10
    else:
        name, size, image_size, encoder_name, batch, repeats = "S/2", 32, 256, "dinov2_vitb14", 8, 3
    full = _full_precision(device)
    torch.manual_seed(0)
    encoder = M.DINOv2_models[encoder_name]().to(device).eval().requires_grad_(False)
    grid = size // 2
    encoder.resample_pos_embed(grid)
    x = torch.randn(batch, 4, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    images = torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, device=device)
    objective = D.Transport("linear", "velocity", "repa")
    steps, flops = {}, {}
    no_scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 and fp32 train without one
    for variant in ("sit", "repa"):
        for precision in (full, "bf16"):
            z_dims = [encoder.embed_dim] if variant == "repa" else ()
            model = M.build_generator(f"SiT-{name}", input_size=size, z_dims=z_dims, encoder_depth=min(8, M.DIT_SIZES[name[:-2]][0]),
                                      learn_sigma=False).to(device).train()
            ema = copy.deepcopy(model).requires_grad_(False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)

            def loss_of(model=model, variant=variant, precision=precision):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    if variant == "repa":
                        with torch.no_grad():
                            targets = [M.encoder_targets(encoder, images, grid)]
                    terms = objective.training_losses(model, x, y)
                    loss = terms["loss"].mean()
                    if variant == "repa":
                        loss = loss + 0.5 * D.alignment_loss(terms["projected"], targets).mean()
                return loss

            def step(model=model, ema=ema, opt=opt, loss_of=loss_of):  # train_dit.py's step with REPA's clipping
                U.optimizer_step(loss_of(), model.parameters(), opt, no_scaler, 1.0, False, device)
                U.update_ema(ema, model, 0.9999)

            key = f"{variant}_{precision}"
            steps[key] = step
            flops[key] = _count_flops(lambda loss_of=loss_of: loss_of().backward())
    seconds = _interleaved(steps, device, repeats)
    result = {"model": f"SiT-{name}", "encoder": encoder_name, "latent": f"4x{size}x{size}", "image": image_size,
              "batch": batch, "sit_tflop_per_step": flops[f"sit_{full}"] / 1e12, "repa_tflop_per_step": flops[f"repa_{full}"] / 1e12}
    peaks = _measured_peaks(device, result)
    for key, s in seconds.items():
        result[f"{key}_img_s"] = batch / s
        _add_mfu(result, key, flops[key], s, peaks, device)
    for precision in (full, "bf16"):
        result[f"repa_{precision}_time_vs_sit"] = seconds[f"repa_{precision}"] / seconds[f"sit_{precision}"]
    return result


def bench_sample_dit(args):
    """DDPM sampling with classifier-free guidance (every step runs the conditional and the
    null-label batch), the generator alone (decoding excluded): DiT's 250 steps; full precision and
    bf16, each warmed up by a 2-step run (kernel loading and tuning stay out of the timing).
    CPU: DiT-S/2 at 4x32x32, batch 4; GPU: DiT-XL/2, batch 32; --preset tiny: DiT-T/2 at 4x8x8, 25 steps."""
    import diffusion as D
    import models as M

    device = torch.device(args.device)
    if args.preset == "tiny":
        name, size, batch, num_steps = "T/2", 8, 4, 25
    elif device.type == "cuda":
        name, size, batch, num_steps = "XL/2", 32, 32, 250
    else:
        name, size, batch, num_steps = "S/2", 32, 4, 250
    torch.manual_seed(0)
    model = M.build_generator(f"DiT-{name}", input_size=size).to(device).eval()
    objective = D.make_objective(dict(kind="diffusion"), model)
    y = torch.randint(0, 1000, (batch,), device=device)

    def run(precision, steps=num_steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            D.generate(model, objective, D.SampleNoise(0, range(batch), device), y, "ddpm", steps, cfg_scale=1.5)

    precisions = (_full_precision(device), "bf16")
    for precision in precisions:
        run(precision, steps=2)
    seconds = _interleaved({p: (lambda p=p: run(p)) for p in precisions}, device, repeats=1, warmup=0)
    result = {"model": f"DiT-{name}", "latent": f"4x{size}x{size}", "batch": batch, "steps": num_steps, "cfg": 1.5}
    for p, s in seconds.items():
        result[f"{p}_img_s"] = batch / s
    return result


def _maskgit_size(args, device):
    """(model, token grid side, batch): MaskGIT-T on 8x8 tokens (--preset tiny), MaskGIT-S on 16x16
    (CPU), v1.0's MaskGIT-B on 16x16 tokens of 256 px images, 1024 codes, batch 64 (its 512 over 8 GPUs)."""
    if args.preset == "tiny":
        return "MaskGIT-T", 8, 8
    return ("MaskGIT-B", 16, 64) if device.type == "cuda" else ("MaskGIT-S", 16, 8)


def bench_train_maskgit(args):
    """One MaskGIT training step as train_maskgit.py takes it (arccos masks, label dropout,
    label-smoothed cross-entropy on the masked tokens, backward, clipping, AdamW with v1.0's betas),
    full precision and bf16 autocast, interleaved; FLOPs counted on the real step (forward and
    backward) and MFU as bench_train_dit."""
    import models as M
    import train_maskgit
    import utils as U

    device = torch.device(args.device)
    name, side, batch = _maskgit_size(args, device)
    repeats = 1 if args.preset == "tiny" else (10 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    z = torch.randint(0, 1024, (batch, side, side), device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    steps, flops = {}, {}
    no_scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 and fp32 train without one
    for precision in (_full_precision(device), "bf16"):
        model = M.MaskGIT_models[name](input_size=side).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=1e-5, fused=True)

        def loss_of(model=model, precision=precision):
            mask = train_maskgit.draw_mask(z, "arccos")
            labels = torch.where(torch.rand(batch, device=device) < 0.1, model.num_classes, y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return train_maskgit.masked_token_loss(model, z, labels, mask, model.mask_token, 0.1)[0]

        def step(model=model, opt=opt, loss_of=loss_of):  # train_maskgit.py's step with v1.0's clipping
            U.optimizer_step(loss_of(), model.parameters(), opt, no_scaler, 1.0, False, device)

        steps[precision] = step
        flops[precision] = _count_flops(lambda loss_of=loss_of: loss_of().backward())
    seconds = _interleaved(steps, device, repeats)
    result = {"model": name, "tokens": f"{side}x{side}", "batch": batch,
              "train_tflop_per_step": flops[_full_precision(device)] / 1e12}
    peaks = _measured_peaks(device, result)
    for precision, s in seconds.items():
        result[f"{precision}_img_s"] = batch / s
        _add_mfu(result, precision, flops[precision], s, peaks, device)
    return result


def bench_sample_maskgit(args):
    """MaskGIT decoding as sample.py runs it: 8 arccos steps, Gumbel temperature 4.5, guidance 4
    (v1.0's w = 3; every step but the first runs the conditional and the null-class batch), the
    transformer alone (VQ decoding excluded); full precision and bf16. Sizes as bench_train_maskgit."""
    import models as M

    device = torch.device(args.device)
    name, side, batch = _maskgit_size(args, device)
    torch.manual_seed(0)
    model = M.MaskGIT_models[name](input_size=side).to(device).eval()
    y = torch.randint(0, 1000, (batch,), device=device)

    def run(precision):
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            M.maskgit_generate(model, y, generators, num_steps=8, cfg_scale=4.0)

    repeats = 1 if args.preset == "tiny" else 3
    seconds = _interleaved({p: (lambda p=p: run(p)) for p in (_full_precision(device), "bf16")}, device, repeats)
    result = {"model": name, "tokens": f"{side}x{side}", "batch": batch, "steps": 8, "cfg": 4.0}
    for p, s in seconds.items():
        result[f"{p}_img_s"] = batch / s
    return result


BENCHMARKS = {"inception": bench_inception, "train_vae": bench_train_vae, "train_dit": bench_train_dit,
              "train_repa": bench_train_repa, "sample_dit": bench_sample_dit, "train_maskgit": bench_train_maskgit,
              "sample_maskgit": bench_sample_maskgit}

# ----------------------------------------------------------------------------- main


def main(args):
    device = torch.device(args.device)
    header = {"torch": torch.__version__, "device": args.device, "preset": args.preset}
    if device.type == "cuda":
        header.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:  # CPU numbers depend on the vector units: bf16 is emulated without AVX-512
        header.update(cpu=_cpu_name(), threads=torch.get_num_threads(), vector_isa=torch.backends.cpu.get_cpu_capability(),
                      hardware_bf16=_native_bf16(device))
    print(", ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    results, failed = {}, []
    for name in args.only or list(BENCHMARKS):
        # each benchmark starts from the scripts' settings (TF32 on CUDA) and its own memory peak
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda"
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        try:
            results[name] = BENCHMARKS[name](args)
        except Exception:  # one failure must not cost the other benchmarks of a GPU window
            traceback.print_exc()
            print(f"{name}: failed (traceback above)", flush=True)
            failed.append(name)
            continue
        if device.type == "cuda":  # every contender of the benchmark is held at once: an upper bound for one run
            results[name]["peak_mem_gb_all_contenders"] = torch.cuda.max_memory_allocated(device) / 2**30
        line = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results[name].items())
        print(f"{name}: {line} ({time.time() - t0:.0f} s)", flush=True)
    if args.out:
        write_json(args.out, dict(header, results=results, failed=failed))
        print(f"wrote {args.out}")
    if failed:
        sys.exit(f"failed: {' '.join(failed)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="throughput benchmarks of every stage")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None, help="benchmarks to run (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available)")
    parser.add_argument("--preset", choices=["tiny"], default=None, help="tiny: small models and batches, one timed round (CPU smoke runs, not measurements)")
    parser.add_argument("--out", default=None, help="JSON file for all results")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="train_dit also times the torch.compile'd bf16 step (default: on a GPU only; "
                             "the compilation takes about a minute)")
    parser.add_argument("--official-dit", default=None,
                        help="a local clone of facebookresearch/DiT (needs timm): train_dit also times its full-precision step")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = args.device == "cuda"
    # bad input fails here, before minutes of benchmarks
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device here; use --device cpu")
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        if os.path.isdir(args.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            parser.error(f"--out {args.out}: give a JSON file name in an existing writable folder")
    if args.official_dit:
        if args.only and "train_dit" not in args.only:
            parser.error("--official-dit is timed by the train_dit benchmark: add train_dit to --only")
        if args.preset == "tiny":
            parser.error("--official-dit: the official code has no DiT-T/2 (--preset tiny's model); drop --preset tiny")
        missing = [p for p in ("models.py", os.path.join("diffusion", "__init__.py"))
                   if not os.path.isfile(os.path.join(args.official_dit, p))]
        if missing:
            parser.error(f"--official-dit {args.official_dit}: not a clone of facebookresearch/DiT (no {', '.join(missing)})")
        if importlib.util.find_spec("timm") is None:  # the official models.py imports it
            parser.error("--official-dit: the official DiT code needs timm (pip install timm)")
    return args


if __name__ == "__main__":
    main(parse_args())
