"""EQ-VAE objective pieces against hand computations, and the real CLI (1 and 2 processes,
exact resume, SIGTERM, NaN stop, input checks)."""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import lpips
import pytest
import torch
import torch.nn.functional as F

import models
import train_vae
import utils
from cli import ENV, ROOT
import cli


def loss_args(**kw):
    base = dict(perceptual_weight=0.0, kl_weight=1e-6, codebook_weight=1.0, disc_weight=0.5, disc_factor=1.0)
    return argparse.Namespace(**{**base, **kw})


# ----------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("config", ["tiny", "tiny-vq"])
def test_identity_tau_gives_the_standard_loss(config):
    """Eq. 5 with tau = I reduces to Eq. 1 (same RNG for the posterior sample)."""
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs[config])
    disc = models.NLayerDiscriminator(ndf=8, n_layers=2)
    x = torch.randn(2, 3, 64, 64).clamp(-1, 1)
    logvar = torch.nn.Parameter(torch.tensor(0.0))
    losses = []
    for tau in (None, models.EqTransform(0, 16, 16, 16, 16)):
        torch.manual_seed(1)
        target, rec, reg, _ = train_vae.forward_step(ae, x, tau, "bicubic", False)
        loss, _ = train_vae.generator_loss(ae.kind, target, rec, reg, logvar, None, disc, loss_args(), True, ae.last_layer())
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(1)
    target, rec, reg, _ = train_vae.forward_step(ae, x, models.EqTransform(1, 16, 16, 8, 8), "bicubic", False)
    other, _ = train_vae.generator_loss(ae.kind, target, rec, reg, logvar, None, disc, loss_args(), True, ae.last_layer())
    assert not torch.equal(losses[0], other)


@pytest.mark.parametrize("config", ["tiny", "tiny-vq"])
def test_the_step_returns_the_features_it_encoded(config):
    """The explicit term reuses E(x) from the step's own forward instead of encoding x again: the
    posterior mean (KL) or the pre-quantization features (VQ) of the untransformed x, with the
    encoder's graph attached, whatever tau the step applies."""
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs[config])
    x = torch.randn(2, 3, 64, 64)
    for tau in (None, models.EqTransform(1, 16, 16, 8, 8)):
        features = train_vae.forward_step(ae, x, tau, "bicubic", False)[3]
        assert torch.equal(features, ae.encode_features(x)) and features.requires_grad


@pytest.mark.parametrize("config", ["tiny", "tiny-vq"])
@pytest.mark.parametrize("size", [64, 60])  # latents 16x16 (even) and 15x15 (odd)
@pytest.mark.parametrize("mode", ["rotation+scale", "rotation+anisotropic", "scale"])
def test_every_tau_gives_matching_target_and_reconstruction(config, size, mode):
    import random

    ae = models.build_autoencoder(models.AE_configs[config])
    x = torch.randn(1, 3, size, size)
    lat = size // ae.downsample_factor
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(4):
            tau = models.sample_eq_transform(lat, lat, mode, rng=rng)
            target, rec, reg, _ = train_vae.forward_step(ae, x, tau, "bicubic", False)
            assert target.shape == rec.shape
            expected = (tau.new_w * 4, tau.new_h * 4) if tau.k % 2 else (tau.new_h * 4, tau.new_w * 4)  # quarter turns swap
            assert target.shape[-2:] == expected


def test_adaptive_weight_and_hinge_loss_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    nll, g = (w * a).sum(), (w * b).sum()  # gradients a (norm 5) and b (norm 1)
    weight = train_vae.adaptive_gan_weight(nll, g, w, disc_weight=0.5)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4) * 0.5)
    tiny_g = (w * 1e-9).sum()
    assert train_vae.adaptive_gan_weight(nll, tiny_g, w, 1.0).item() == pytest.approx(1e4)  # the clamp
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # real: relu(1 - r) = [0, 0.5, 2] -> mean 5/6; fake: relu(1 + f) = [0, 1, 2] -> mean 1
    assert train_vae.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))


def test_kl_nll_matches_ldm_formula_and_lpips_matches_package():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    ours = models.load_lpips(random_backbone=True)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(ours.state_dict())
    logvar = torch.nn.Parameter(torch.tensor(0.3))
    reg = torch.tensor(5.0)
    loss, terms = train_vae.generator_loss("kl", x, y, reg, logvar, ours, None, loss_args(perceptual_weight=1.0), False, None)
    p = reference(x, y)
    assert terms["lpips"].item() == pytest.approx(p.mean().item(), rel=1e-6)
    rec = (x - y).abs() + p
    expected = (rec / torch.exp(logvar) + logvar).sum() / 2 + 1e-6 * reg
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_explicit_loss_by_hand():
    """Eq. 4 for a quarter turn (no resampling): the squared norm per image, summed over the
    latent's C x h x w, then averaged over the batch; C x h x w times an element mean."""
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs["tiny"])
    x = torch.randn(3, 3, 64, 64)
    tau = models.EqTransform(1, 16, 16, 16, 16)
    with torch.no_grad():
        got = train_vae.explicit_loss(ae, x, ae.encode_features(x), tau, False, "bicubic", False)
        z, z_rot = ae.encode_features(x), ae.encode_features(torch.rot90(x, 1, dims=(-2, -1)))
        per_image = [((torch.rot90(z[i], 1, dims=(-2, -1)) - z_rot[i]) ** 2).sum() for i in range(3)]
    assert got.item() == pytest.approx(sum(per_image).item() / 3, rel=1e-5)
    assert got.item() == pytest.approx(F.mse_loss(torch.rot90(z, 1, dims=(-2, -1)), z_rot).item() * z[0].numel(), rel=1e-5)


def test_explicit_loss_of_a_vq_model_is_an_element_mean():
    """For VQ models Eq. 4 is averaged over the latent's elements, as taming averages the
    reconstruction, codebook and commitment terms (a sum would weigh lambda C x h x w times more
    than on the KL models); here for a scale, which resamples both sides."""
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs["tiny-vq"])
    x = torch.randn(2, 3, 64, 64)
    tau = models.eq_transform(16, 16, scale=0.5)
    with torch.no_grad():
        got = train_vae.explicit_loss(ae, x, ae.encode_features(x), tau, False, "bicubic", True)
        tz = F.interpolate(ae.encode_features(x), size=(8, 8), mode="bicubic", antialias=True)
        ztx = ae.encode_features(F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True))
    assert got.item() == pytest.approx(F.mse_loss(tz, ztx).item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["explicit", "explicit-sg"])
def test_explicit_term_joins_every_step(mode):
    """App. A.1: L_VAE + lambda L_explicit on every step (no EQ branch): the loss is the standard
    loss of the same step plus 0.1 x the explicit term."""
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs["tiny"])
    disc = models.NLayerDiscriminator(ndf=8, n_layers=2)
    x = torch.randn(2, 3, 64, 64).clamp(-1, 1)
    explicit = train_vae.parse_args(["--preset", "tiny", "--eq-mode", mode, "--disc-weight", "0", "--perceptual-weight", "0"])
    standard = train_vae.parse_args(["--preset", "tiny", "--eq-prob", "0", "--disc-weight", "0", "--perceptual-weight", "0"])
    for a in (explicit, standard):
        train_vae.resolve_kind_defaults(a, "kl")
    assert explicit.explicit_weight == 0.1
    rng = random.Random(0)
    for step in range(4):
        torch.manual_seed(step)
        loss, d_loss, terms, kind = train_vae.eq_vae_objective(ae, disc, x, step, rng, explicit, torch.tensor(0.0), None)
        torch.manual_seed(step)
        plain, _, _, _ = train_vae.eq_vae_objective(ae, disc, x, step, random.Random(0), standard, torch.tensor(0.0), None)
        assert kind == "standard" and d_loss is None and terms["explicit"] > 0
        assert loss.item() == pytest.approx(plain.item() + 0.1 * terms["explicit"].item(), rel=1e-5)


@pytest.mark.parametrize("stop_grad", [False, True])
def test_explicit_loss_gradients(stop_grad):
    """Eq. 4 trains only the encoder; with sg[E(tau x)] only the tau E(x) branch carries gradient."""
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs["tiny"])
    x = torch.randn(2, 3, 64, 64)
    tau = models.EqTransform(1, 16, 16, 8, 8)
    train_vae.explicit_loss(ae, x, ae.encode_features(x), tau, stop_grad, "bicubic", False).backward()
    assert all(p.grad is None for p in ae.decoder.parameters())
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0
    got = ae.encoder.conv_in.weight.grad.clone()
    ae.zero_grad()
    tz = models.apply_eq_transform(ae.encode_features(x), tau)
    ztx = ae.encode_features(models.apply_eq_transform(x, tau))
    ((tz - ztx.detach()) ** 2).flatten(1).sum(1).mean().backward()  # the loss with sg[E(tau x)]
    matches = torch.allclose(got, ae.encoder.conv_in.weight.grad, rtol=1e-4, atol=1e-6)
    assert matches == stop_grad  # without sg, E(tau x) adds its own gradient


def test_adaptive_weight_is_the_same_on_scaled_losses():
    """fp16: the weight from gradients of loss x scale, divided back, equals the unscaled weight."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6e-3, 0.8e-3])
    plain = train_vae.adaptive_gan_weight((w * a).sum(), (w * b).sum(), w, 1.0)
    scaled = train_vae.adaptive_gan_weight((w * a).sum(), (w * b).sum(), w, 1.0, loss_scale=65536.0)
    assert plain.item() == pytest.approx(5.0 / (1e-3 + 1e-4))
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-6)
    huge = torch.tensor([3e34, 4e34])  # x 65536 overflows fp32: inf / inf, a step the scaler skips
    assert train_vae.adaptive_gan_weight((w * huge).sum(), (w * huge).sum(), w, 1.0, loss_scale=65536.0).item() == 0.0


def test_bench_times_the_trainers_objective(monkeypatch):
    """bench.py's train_vae step runs the trainer's objective and optimizers, not a copy."""
    import bench

    calls = []
    real = train_vae.eq_vae_objective

    def counted(ae, disc, x, step, rng, args, logvar, *rest):
        calls.append((args.eq_prob, logvar.requires_grad))
        return real(ae, disc, x, step, rng, args, logvar, *rest)

    monkeypatch.setattr(train_vae, "eq_vae_objective", counted)
    result = bench.bench_train_vae(argparse.Namespace(device="cpu", preset="tiny"))
    assert calls and all(c == (1.0, False) for c in calls)  # EQ steps; the log-variance is not trained
    from test_bench import check_rates

    check_rates(result, ("fp32", "bf16", "bf16_channels_last"))  # the bf16 profile's contenders, with counted FLOPs
    assert result["train_tflop_per_step"] > 0


# ----------------------------------------------------------------------------- the CLI


def run_cli(args, nproc=1, timeout=300):
    return cli.run("train_vae.py", args, nproc=nproc, timeout=timeout)


def refusal(argv, capsys):
    from test_train_dit import refusal as train_dit_refusal

    return train_dit_refusal(argv, capsys, module=train_vae)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("config", ["tiny", "tiny-vq"])
def test_tiny_smoke_single_process(tmp_path, config):
    """One process, 4 steps: every file of the run folder, finite losses of the configured kind; the KL
    model exported for diffusers encodes as ours. Two processes: the resume test below."""
    run = tmp_path / "run"
    export = ["--export-diffusers", str(tmp_path / "hf")] if config == "tiny" else []
    out = run_cli(["--preset", "tiny", "--vae", f"scratch:{config}", "--run-dir", str(run), *export])
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("log.txt", "metrics.jsonl", "args.json", "autoencoder.pt", "checkpoints/latest.pt",
                 "checkpoints/0000002.pt", "checkpoints/0000004.pt", "figure2-0000004.png"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train)
    assert "train/g" in train[0] and "train/d" in train[0] and "train/lpips" in train[0]
    assert ("train/kl" if config == "tiny" else "train/vq") in train[0]
    evals = [r for r in records if "eval/psnr" in r]
    assert evals and evals[0]["eval/eq_err_rot"] > 0
    ae = models.load_autoencoder(str(run / "autoencoder.pt"))
    assert ae.kind == ("kl" if config == "tiny" else "vq")
    if export:
        diffusers = pytest.importorskip("diffusers")
        hf = diffusers.AutoencoderKL.from_pretrained(tmp_path / "hf")
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(hf.encode(x).latent_dist.mean, ae.encode(x).mean, rtol=1e-4, atol=1e-4)


def test_two_process_resume_equals_the_uninterrupted_run(tmp_path):
    """On 2 processes, a VQ model with the explicit term from step 2, two micro-batches per step and
    an EMA: resumed at step 2, the step-4 weights, discriminator and EMA equal the uninterrupted run's
    bit for bit (every rank's tau and branch streams are restored). The explicit term is logged on
    every step, 0 before --eq-start (one set of keys on both ranks)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--preset", "tiny", "--vae", "scratch:tiny-vq", "--eq-mode", "explicit-sg", "--eq-start", "2",
              "--grad-accum", "2", "--ema-decay", "0.9", "--log-every", "1", "--ckpt-every", "2"]
    out = run_cli([*common, "--run-dir", str(full)], nproc=2, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world size 2" in (full / "log.txt").read_text()
    assert len(utils.load_checkpoint(str(full / "checkpoints" / "latest.pt"))["rng"]) == 2  # one stream per rank
    explicit = [r["train/explicit"] for r in read_metrics(full) if "train/loss" in r]
    assert len(explicit) == 4 and explicit[:2] == [0.0, 0.0] and min(explicit[2:]) > 0
    (resumed / "checkpoints").mkdir(parents=True)
    os.link(full / "checkpoints" / "0000002.pt", resumed / "checkpoints" / "0000002.pt")
    out = run_cli([*common, "--resume", str(resumed / "checkpoints" / "0000002.pt")], nproc=2, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = (utils.load_checkpoint(str(run / "checkpoints" / "0000004.pt")) for run in (full, resumed))
    assert a["ema"] is not None
    for part in ("model", "discriminator", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after a 2-process resume"


def test_resume_reproduces_uninterrupted_run(tmp_path, capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    # the lr decays over the last 3 steps: 1, 1, 2/3, 1/3 of 1e-4, a function of the step that resumes too
    common = ["--preset", "tiny", "--max-steps", "4", "--ckpt-every", "2", "--lr-decay-steps", "3", "--log-every", "1"]
    assert run_cli([*common, "--run-dir", str(full)]).returncode == 0
    (resumed / "checkpoints").mkdir(parents=True)
    os.link(full / "checkpoints" / "0000002.pt", resumed / "checkpoints" / "0000002.pt")
    out = run_cli([*common, "--resume", str(resumed / "checkpoints" / "0000002.pt")])
    assert out.returncode == 0, out.stderr[-3000:]
    a = utils.load_checkpoint(str(full / "checkpoints" / "0000004.pt"))
    b = utils.load_checkpoint(str(resumed / "checkpoints" / "0000004.pt"))
    for part in ("model", "discriminator"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert torch.equal(a["logvar"], b["logvar"])
    assert a["logvar"].item() == 0.0  # LDM never optimises its log-variance
    assert a["step"] == b["step"] == 4
    lrs = {run: {r["step"]: r["train/lr"] for r in read_metrics(run) if "train/lr" in r} for run in (full, resumed)}
    assert lrs[full] == pytest.approx({1: 1e-4, 2: 1e-4, 3: 2e-4 / 3, 4: 1e-4 / 3})
    assert lrs[resumed] == pytest.approx({3: 2e-4 / 3, 4: 1e-4 / 3})
    assert b["opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4 / 3)
    # a checkpoint outside a checkpoints/ folder: its own folder is the run folder. The
    # discriminator's shape is the checkpoint's; objective flags change only when allowed
    (tmp_path / "loose").mkdir()
    os.link(full / "checkpoints" / "0000002.pt", tmp_path / "loose" / "step2.pt")
    loose = ["--max-steps", "3", "--resume", str(tmp_path / "loose" / "step2.pt")]
    code, err = refusal([*common, *loose, "--disc-channels", "64"], capsys)
    assert code == 2 and "--disc-channels 64 (checkpoint: 8)" in err
    code, err = refusal([*common, *loose, "--eq-prob", "0.9", "--interp", "bilinear"], capsys)
    assert code == 2 and "--eq-prob 0.9 (checkpoint: 0.5), --interp bilinear (checkpoint: bicubic)" in err
    assert "--allow-changed-flags" in err and not (tmp_path / "loose" / "checkpoints").exists()
    out = run_cli([*common, *loose, "--eq-prob", "0.9", "--allow-changed-flags"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "loose" / "checkpoints" / "0000003.pt").is_file()
    assert "--allow-changed-flags: continuing with --eq-prob 0.9" in (tmp_path / "loose" / "log.txt").read_text()


def make_images(folder, sizes):
    from PIL import Image

    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")


def test_small_images_are_enlarged_and_non_square_batches_train(tmp_path):
    """Images below the crop are enlarged with one note (the official pipeline's resize), not a stop;
    --crop none trains on non-square images, the latent size taken from each batch."""
    make_images(tmp_path / "mixed", [(40, 30), (100, 80), (30, 50), (90, 120)])
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--data-path", str(tmp_path / "mixed"), "--max-steps", "1", "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 image(s) under" in (run / "log.txt").read_text() and "below 64px" in (run / "log.txt").read_text()
    make_images(tmp_path / "wide", [(80, 64)] * 4)
    run = tmp_path / "wide-run"
    out = run_cli(["--preset", "tiny", "--data-path", str(tmp_path / "wide"), "--crop", "none", "--eq-prob", "1",
                   "--max-steps", "2", "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    train = [r for r in read_metrics(run) if "train/loss" in r]
    assert train[-1]["step"] == 2 and train[-1]["train/eq_steps"] == 1.0


def test_whole_images_are_checked_before_the_run_starts(tmp_path, capsys):
    """--crop none stacks whole images: mixed sizes, a size off the latent grid, or images too small
    for LPIPS are refused naming the files, before any folder is written. A rotation-only or an
    explicit-mode run never downscales what the discriminator and LPIPS see, so 32 px is enough."""
    make_images(tmp_path / "mixed", [(64, 64), (64, 64), (80, 64)])
    make_images(tmp_path / "odd", [(70, 50)] * 2)
    make_images(tmp_path / "small", [(40, 40)] * 2)
    results = tmp_path / "r"
    for folder, message in (("mixed", "0.png is 64x64"), ("odd", "the images' size 70x50 is not a multiple"),
                            ("small", "LPIPS-VGG needs images of 16px or more, and the smallest image it is shown is 12px")):
        with pytest.raises(SystemExit) as e:
            train_vae.main(train_vae.parse_args(["--preset", "tiny", "--data-path", str(tmp_path / folder), "--crop", "none",
                                                 "--results-dir", str(results)]))
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not results.exists()
    for flags in (["--eq-transform", "rotation"], ["--eq-mode", "explicit"]):
        run = tmp_path / f"run-{flags[1]}"
        train_vae.main(train_vae.parse_args(["--preset", "tiny", "--image-size", "32", "--max-steps", "1", "--eval-every", "100",
                                             *flags, "--run-dir", str(run)]))
        assert (run / "autoencoder.pt").is_file()


def test_a_lightning_checkpoint_brings_its_optimizer_state(tmp_path):
    """The official run resumes LDM's .ckpt through Lightning, which restores its Adam states: we log
    the stored lr, and --restore-optimizer continues the moments with that lr."""
    torch.manual_seed(0)
    config = dict(models.AE_configs["tiny"], ch=32, norm_groups=32, ch_mult=[1, 2])  # inferable from LDM names
    ae, disc = models.build_autoencoder(config), models.NLayerDiscriminator(ndf=8, n_layers=2)
    opt_ae, opt_disc = train_vae.build_optimizers(ae, disc, lr=3e-4)
    for model, opt in ((ae, opt_ae), (disc, opt_disc)):
        sum(p.sum() for p in model.parameters()).backward()
        opt.step()
    state = {**ae.state_dict(), **{f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()}}
    torch.save({"state_dict": state, "optimizer_states": [opt_ae.state_dict(), opt_disc.state_dict()]}, tmp_path / "ldm.ckpt")
    common = ["--preset", "tiny", "--vae", str(tmp_path / "ldm.ckpt"), "--max-steps", "1"]
    out = run_cli([*common, "--run-dir", str(tmp_path / "fresh")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "carries optimizer_states at lr 0.0003; this run starts a fresh Adam at lr 0.0001" in (tmp_path / "fresh" / "log.txt").read_text()
    assert utils.load_checkpoint(str(tmp_path / "fresh" / "checkpoints" / "latest.pt"))["opt"]["state"][0]["step"] == 1
    out = run_cli([*common, "--restore-optimizer", "--run-dir", str(tmp_path / "restored")])
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = utils.load_checkpoint(str(tmp_path / "restored" / "checkpoints" / "latest.pt"))
    for name in ("opt", "opt_disc"):
        assert ckpt[name]["param_groups"][0]["lr"] == pytest.approx(3e-4) and ckpt[name]["state"][0]["step"] == 2
    assert ckpt["args"]["lr"] == pytest.approx(3e-4)
    out = run_cli(["--resume", str(tmp_path / "restored"), "--max-steps", "2"])  # continues at the stored lr
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = utils.load_checkpoint(str(tmp_path / "restored" / "checkpoints" / "latest.pt"))
    assert ckpt["step"] == 2 and ckpt["opt"]["param_groups"][0]["lr"] == pytest.approx(3e-4)


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "train_vae.py", "--preset", "tiny", "--max-steps", "100000", "--log-every", "1",
           "--ckpt-every", "100000", "--eval-every", "100000", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.txt").exists() and "step 2/" in (run / "log.txt").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    ckpt = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert ckpt["step"] >= 2
    assert "stop requested" in (run / "log.txt").read_text()


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_a_stop_on_the_last_step_still_writes_the_final_weights(tmp_path, monkeypatch):
    """A SIGTERM that lands on the last step finishes the run (autoencoder.pt written, exit 0 without
    SystemExit), instead of asking for a --resume that has nothing left to do."""
    class Requested(utils.StopSignal):
        def __init__(self):
            super().__init__()
            self.requested = True

    monkeypatch.setattr(utils, "StopSignal", Requested)
    run = tmp_path / "run"
    train_vae.main(train_vae.parse_args(["--preset", "tiny", "--max-steps", "1", "--run-dir", str(run)]))
    assert (run / "autoencoder.pt").is_file() and "stop requested" not in (run / "log.txt").read_text()


@pytest.mark.parametrize("planted", ["loss", "autoencoder-gradient", "discriminator-gradient"])
def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, planted):
    """A NaN loss, or a finite loss with a NaN gradient (no fp16 scaler would skip it under bf16 or
    fp32), stops the run before the step is applied."""
    real = train_vae.eq_vae_objective
    calls = {"n": 0}

    def objective(*a, **k):
        loss, d_loss, terms, kind = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            if planted == "loss":
                loss = loss * float("nan")
                terms["loss"] = loss.detach()
            elif planted == "autoencoder-gradient":
                loss = NanGradient.apply(loss)
            else:
                d_loss = NanGradient.apply(d_loss)
        return loss, d_loss, terms, kind

    monkeypatch.setattr(train_vae, "eq_vae_objective", objective)
    run = tmp_path / "run"
    args = train_vae.parse_args(["--preset", "tiny", "--max-steps", "6", "--ckpt-every", "2", "--log-every", "1",
                                 "--run-dir", str(run)])
    with pytest.raises(SystemExit) as e:
        train_vae.main(args)
    assert e.value.code == 3
    assert "non-finite loss or gradient norm at step 3" in (run / "log.txt").read_text()
    last = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert last["step"] == 2 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (run / "checkpoints" / "0000003.pt").exists()


def test_bad_input_fails_before_training(tmp_path, capsys):
    code, err = refusal(["--preset", "tiny", "--data-path", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--data-path" in err and "nowhere" in err
    assert not (tmp_path / "r").exists()  # nothing written
    code, err = refusal(["--preset", "tiny", "--vae", "scratch:tiny-vq", "--kl-weight", "1e-6", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--kl-weight" in err and "VQ" in err
    code, err = refusal(["--preset", "tiny", "--min-crop-frac", "0", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--min-crop-frac 0.0 is out of range" in err
    code, err = refusal(["--preset", "tiny", "--eq-mode", "explicit", "--eq-prob", "0.5", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--eq-prob applies to --eq-mode implicit only" in err
    code, err = refusal(["--preset", "tiny", "--restore-optimizer", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "scratch:tiny carries no optimizer_states" in err
    code, err = refusal(["--preset", "tiny", "--vae", str(tmp_path / "missing.ckpt"), "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "missing.ckpt" in err
    with pytest.raises(SystemExit):
        train_vae.check_args(train_vae.parse_args(["--preset", "tiny", "--global-batch-size", "3"]), world_size=2)
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--preset", "tiny", "--eq-angles", "45"])
    with pytest.raises(SystemExit):
        train_vae.check_args(train_vae.parse_args(["--preset", "tiny", "--lr-decay-steps", "-1"]), world_size=1)
    assert "--lr-decay-steps -1 is out of range" in capsys.readouterr().err
    (tmp_path / "garbage.pt").write_bytes(os.urandom(256))
    (tmp_path / "demo").mkdir()  # the demo refuses a bad flag before it replaces its previous folder
    (tmp_path / "demo" / "demo.json").write_text("kept")
    for argv, message in ((["--demo-base", "train", "--demo-base-lr", "-1"], "--demo-base-lr -1.0 is out of range"),
                          (["--demo-base", str(tmp_path / "none.pt")], "none.pt is not a file: give an autoencoder file, or 'train'"),
                          (["--demo-base-steps", "5", "--vae", "scratch:tiny"],
                           "--vae, --demo-base-steps: for the base that --demo-base train trains"),
                          (["--demo-base", str(tmp_path / "garbage.pt")], "garbage.pt: "),
                          (["--run-dir", str(tmp_path / "x")], "--run-dir: not with --preset demo")):
        with pytest.raises(SystemExit):
            train_vae.run_demo(train_vae.parse_args(["--preset", "demo", *argv, "--results-dir", str(tmp_path)]))
        assert message in capsys.readouterr().err
    assert (tmp_path / "demo" / "demo.json").read_text() == "kept"
    code, err = refusal(["--preset", "tiny", "--num-demo-eval", "8", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--num-demo-eval: for --preset demo only" in err
    code, err = refusal(["--preset", "tiny", "--lr", "-1", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--lr -1.0 is out of range" in err and "Traceback" not in err
    code, err = refusal(["--preset", "tiny", "--explicit-weight", "5", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--explicit-weight weighs the App. A.1 term" in err
    code, err = refusal(["--preset", "tiny", "--eq-transform", "scale", "--eq-angles", "90", "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--eq-angles has no effect with --eq-transform scale" in err
    models.save_autoencoder(models.build_autoencoder(models.AE_configs["tiny"]), str(tmp_path / "weights.pt"))
    code, err = refusal(["--resume", str(tmp_path / "weights.pt")], capsys)
    assert code == 2 and "holds weights, not a training state" in err and "Traceback" not in err
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(256)) * 8)
    code, err = refusal(["--preset", "tiny", "--vae", str(tmp_path / "noise.ckpt"), "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "is not a PyTorch checkpoint" in err and "--trust-checkpoint" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,message", [
    (["--num-workers", "-1"], "--num-workers must be 0 or more"),
    (["--disc-layers", "-1"], "--disc-layers must be 0 or more"),
    (["--disc-channels", "0"], "--disc-channels must be a positive integer"),
    (["--image-size", "0"], "--image-size must be a positive integer"),
    (["--logvar", "nan"], "--logvar nan is not a number"),
    (["--eq-scales", "0.5,nan"], "each scale must lie in (0, 1]"),
    (["--eq-scales", "3"], "each scale must lie in (0, 1]"),
    (["--eq-scales", "0"], "each scale must lie in (0, 1]"),
    (["--data-path", "builtin:shapes:-5"], "N, the number of images, must be 1 or more"),
    (["--val-data-path", "builtin:shapes:0"], "--val-data-path: 'builtin:shapes:0'"),
])
def test_bad_numbers_fail_in_check_args(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_vae.check_args(train_vae.parse_args(["--preset", "tiny", *flags]), world_size=1)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_lpips_needs_16px_and_resume_keeps_vae_and_batch(tmp_path, capsys):
    """LPIPS-VGG cannot see the smallest tau image of a 32 px run (8 px): refused before the run
    folder. A resumed run restores --vae with the other flags, and refuses another global batch
    (the epoch's remaining images would shift)."""
    with pytest.raises(SystemExit):
        train_vae.main(train_vae.parse_args(["--preset", "tiny", "--image-size", "32", "--disc-weight", "0",
                                                 "--results-dir", str(tmp_path / "r")]))
    assert "LPIPS-VGG needs images of 16px or more, and the smallest image it is shown is 8px" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    run = tmp_path / "run"
    assert run_cli(["--preset", "tiny", "--max-steps", "1", "--run-dir", str(run)]).returncode == 0
    out = run_cli(["--resume", str(run / "checkpoints" / "latest.pt"), "--max-steps", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run / "args.json").read_text())["vae"] == "scratch:tiny"
    assert (run / "log.txt").read_text().count("autoencoder scratch:tiny (kl") == 2  # the resumed run's too
    code, err = refusal(["--resume", str(run / "checkpoints" / "latest.pt"), "--max-steps", "3", "--global-batch-size", "8"], capsys)
    assert code == 2 and "--global-batch-size 8 (checkpoint: 4)" in err


def test_pretrained_discriminator_and_logvar_are_restored(tmp_path):
    """Starting weights that carry LDM's `loss.*` entries bring their discriminator and logvar."""
    torch.manual_seed(0)
    disc = models.NLayerDiscriminator(ndf=8, n_layers=2)
    extras = {f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()}
    extras["loss.logvar"] = torch.tensor(0.7)
    models.save_autoencoder(models.build_autoencoder(models.AE_configs["tiny"]), tmp_path / "start.pt", extras=extras)
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--vae", str(tmp_path / "start.pt"), "--max-steps", "1", "--lr", "0",
                   "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "restored the pretrained discriminator" in log and "restored the pretrained logvar 0.7000" in log
    ckpt = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert torch.equal(ckpt["discriminator"]["main.0.weight"], disc.state_dict()["main.0.weight"])
    assert ckpt["logvar"].item() == pytest.approx(0.7)
    out = run_cli(["--preset", "tiny", "--max-steps", "1", "--run-dir", str(tmp_path / "fresh")])
    assert "carries no discriminator: training a fresh one" in (tmp_path / "fresh" / "log.txt").read_text()
    # --disc-weight 0 leaves out a discriminator it never received (random weights), but passes a
    # received one on, also across a --resume
    saved_disc = lambda run_dir: {k for k in torch.load(run_dir / "autoencoder.pt", weights_only=True)["extras"]
                                  if k.startswith("loss.discriminator.")}
    for start, name, received in ((tmp_path / "start.pt", "kept", True), ("scratch:tiny", "dropped", False)):
        common = ["--preset", "tiny", "--vae", str(start), "--disc-weight", "0", "--run-dir", str(tmp_path / name)]
        assert run_cli([*common, "--max-steps", "2"]).returncode == 0
        resumed = run_cli(["--preset", "tiny", "--disc-weight", "0", "--max-steps", "3",
                           "--resume", str(tmp_path / name / "checkpoints" / "latest.pt")])
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert bool(saved_disc(tmp_path / name)) == received


def demo_table_row(path, num_images):
    """What the demo's table says of one autoencoder file, computed directly."""
    args = train_vae.parse_args(["--preset", "demo", "--num-eval-images", str(num_images)])
    return train_vae.evaluate_batch(models.load_autoencoder(path).eval(), train_vae.held_out_batch(args, None), args)


def test_demo_branches_fine_tune_one_trained_base_with_different_objectives(tmp_path):
    """--preset demo --demo-base train on 3 base steps and 2 per branch: the control and EQ-VAE
    branches both fine-tune the base's weights (a fresh optimizer, prior preservation on), only the
    EQ branch takes equivariance steps, and the table, JSON and labelled figures are written. The
    base trains at --demo-base-lr, the branches at --lr, each stage's lr decaying over its last
    --lr-decay-steps."""
    out = run_cli(["--preset", "demo", "--demo-base", "train", "--demo-base-steps", "3", "--max-steps", "2", "--eq-prob", "1",
                   "--num-demo-eval", "4", "--log-every", "1", "--lr-decay-steps", "2", "--results-dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    demo = tmp_path / "demo"
    records = {name: [r for r in read_metrics(demo / name) if "train/loss" in r] for name in ("base", "control", "eq-vae")}
    steps = {name: [(r["step"], r["train/eq_steps"]) for r in rs] for name, rs in records.items()}
    assert steps == {"base": [(1, 0.0), (2, 0.0), (3, 0.0)], "control": [(1, 0.0), (2, 0.0)], "eq-vae": [(1, 1.0), (2, 1.0)]}
    lrs = {name: [r["train/lr"] for r in rs] for name, rs in records.items()}
    assert lrs["base"] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert lrs["control"] == lrs["eq-vae"] == pytest.approx([3e-4, 1.5e-4])
    # the base stands for the pretrained model: the prior preservation belongs to the fine-tuning branches
    base_file = str(demo / "base" / "autoencoder.pt")
    ckpts = {name: utils.load_checkpoint(str(demo / name / "checkpoints" / "latest.pt")) for name in ("base", "control", "eq-vae")}
    assert {name: c["args"]["lowres_prob"] for name, c in ckpts.items()} == {"base": 0.0, "control": 0.25, "eq-vae": 0.25}
    assert ckpts["control"]["args"]["vae"] == ckpts["eq-vae"]["args"]["vae"] == base_file
    # --disc-weight 0: the base's file keeps no untrained discriminator, only the weights and the logvar
    assert set(torch.load(base_file, weights_only=True)["extras"]) == {"loss.logvar"}
    table = json.loads((demo / "demo.json").read_text())
    assert list(table) == ["base", "control", "eq-vae"] and table["control"] != table["eq-vae"]
    assert table["base"] == pytest.approx(demo_table_row(base_file, 4))
    assert "EQ-VAE demo (4 held-out builtin:shapes-plain images, 32px)" in out.stdout
    assert (demo / "figure2.png").is_file() and (demo / "figure2-rot.png").is_file()
    assert models.load_autoencoder(str(demo / "eq-vae" / "autoencoder.pt")).downsample_factor == 4


def test_demo_fine_tunes_the_shipped_base_by_default(tmp_path):
    """Without --demo-base the branches fine-tune assets/demo-vae-base.pt (the README's base: a
    scratch:small autoencoder, 0.95M parameters) and the table's base row scores that file."""
    out = run_cli(["--preset", "demo", "--max-steps", "1", "--num-demo-eval", "4", "--results-dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    shipped = os.path.join(ROOT, "assets", "demo-vae-base.pt")
    config = models.load_autoencoder(shipped).config
    assert {k: config[k] for k in models.AE_configs["small"]} == models.AE_configs["small"]
    assert not (tmp_path / "demo" / "base").exists()
    ckpt = utils.load_checkpoint(str(tmp_path / "demo" / "eq-vae" / "checkpoints" / "latest.pt"))
    assert os.path.samefile(ckpt["args"]["vae"], shipped) and ckpt["step"] == 1
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["base"] == pytest.approx(demo_table_row(shipped, 4))


def test_demo_stages_pass_their_own_checks_with_an_explicit_eq_branch(tmp_path):
    """--eq-mode explicit --explicit-weight: the EQ branch keeps both, the implicit base and control
    run without the weight (check_args refuses --explicit-weight with the implicit objective), and
    no stage carries the --demo-* flags (refused outside --preset demo)."""
    args = train_vae.parse_args(["--preset", "demo", "--demo-base", "train", "--eq-mode", "explicit", "--explicit-weight", "0.2",
                                 "--num-demo-eval", "8", "--demo-base-steps", "3", "--demo-base-lr", "0", "--export-diffusers", "out"])
    base, branches = train_vae.demo_stages(args, str(tmp_path))
    assert branches["eq-vae"]["eq_mode"] == "explicit" and "explicit_weight" in branches["eq-vae"]["cli_flags"]
    assert {base["eq_mode"], branches["control"]["eq_mode"]} == {"implicit"}
    for stage in (base, *branches.values()):
        train_vae.check_args(argparse.Namespace(**stage), world_size=1)  # exits on a refused combination
    assert branches["control"]["vae"] == branches["eq-vae"]["vae"] == os.path.join(str(tmp_path), "base", "autoencoder.pt")
    assert base["lr"] == 0 and base["max_steps"] == 3  # --demo-base-lr 0 is a learning rate, not "unset"
    # one diffusers export, of the demo's result: from the EQ branch only
    assert [stage["export_diffusers"] for stage in (base, branches["control"], branches["eq-vae"])] == [None, None, "out"]
