"""EQ-VAE objective pieces against hand computations, and the real CLI (1 and 2 processes,
exact resume, SIGTERM, NaN stop, input checks)."""
import argparse
import json
import os
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


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
        target, rec, reg = train_vae.forward_step(ae, x, tau, "bicubic", False)
        loss, _ = train_vae.generator_loss(ae.kind, target, rec, reg, logvar, None, disc, loss_args(), True, ae.last_layer())
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    torch.manual_seed(1)
    target, rec, reg = train_vae.forward_step(ae, x, models.EqTransform(1, 16, 16, 8, 8), "bicubic", False)
    other, _ = train_vae.generator_loss(ae.kind, target, rec, reg, logvar, None, disc, loss_args(), True, ae.last_layer())
    assert not torch.equal(losses[0], other)


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
            target, rec, reg = train_vae.forward_step(ae, x, tau, "bicubic", False)
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


@pytest.mark.parametrize("stop_grad", [False, True])
def test_explicit_loss_gradients(stop_grad):
    """Eq. 4 trains only the encoder; with sg[E(tau x)] only the tau E(x) branch carries gradient."""
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs["tiny"])
    x = torch.randn(2, 3, 64, 64)
    tau = models.EqTransform(1, 16, 16, 8, 8)
    train_vae.explicit_loss(ae, x, tau, stop_grad, "bicubic", False).backward()
    assert all(p.grad is None for p in ae.decoder.parameters())
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0
    got = ae.encoder.conv_in.weight.grad.clone()
    ae.zero_grad()
    tz = models.apply_eq_transform(ae.encode_features(x), tau)
    ztx = ae.encode_features(models.apply_eq_transform(x, tau))
    F.mse_loss(tz, ztx.detach()).backward()
    torch.testing.assert_close(got, ae.encoder.conv_in.weight.grad) if stop_grad else \
        pytest.raises(AssertionError, torch.testing.assert_close, got, ae.encoder.conv_in.weight.grad)


# ----------------------------------------------------------------------------- the CLI


def run_cli(args, nproc=1, timeout=300):
    if nproc == 1:
        cmd = [sys.executable, "train_vae.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_vae.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("config", ["tiny", "tiny-vq"])
def test_tiny_smoke_single_process(tmp_path, config):
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--vae", f"scratch:{config}", "--run-dir", str(run)])
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


def test_explicit_mode_two_processes_log_the_same_keys(tmp_path):
    """Ranks that drew different branches still all-reduce one set of metric keys."""
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--eq-mode", "explicit-sg", "--eq-prob", "0.5", "--log-every", "1",
                   "--ckpt-every", "100", "--run-dir", str(run)], nproc=2, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all("train/explicit" in r for r in read_metrics(run) if "train/loss" in r)


def test_tiny_smoke_two_processes_and_diffusers_export(tmp_path):
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--run-dir", str(run), "--export-diffusers", str(tmp_path / "hf")], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "world size 2" in log and "step 4/4" in log
    ckpt = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    diffusers = pytest.importorskip("diffusers")
    hf = diffusers.AutoencoderKL.from_pretrained(tmp_path / "hf")
    ours = models.load_autoencoder(str(run / "autoencoder.pt"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf.encode(x).latent_dist.mean, ours.encode(x).mean, rtol=1e-4, atol=1e-4)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--preset", "tiny", "--max-steps", "4", "--ckpt-every", "2"]
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
    # a checkpoint outside a checkpoints/ folder: its own folder is the run folder; the
    # discriminator's shape comes from the checkpoint, whatever the command line says
    (tmp_path / "loose").mkdir()
    os.link(full / "checkpoints" / "0000002.pt", tmp_path / "loose" / "step2.pt")
    out = run_cli([*common, "--max-steps", "3", "--disc-channels", "64", "--resume", str(tmp_path / "loose" / "step2.pt")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "loose" / "checkpoints" / "0000003.pt").is_file()
    assert "--disc-channels 8 from the resumed checkpoint" in (tmp_path / "loose" / "log.txt").read_text()


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = train_vae.generator_loss
    calls = {"n": 0}

    def planted(*a, **k):
        loss, terms = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), terms

    monkeypatch.setattr(train_vae, "generator_loss", planted)
    run = tmp_path / "run"
    args = train_vae.parse_args(["--preset", "tiny", "--max-steps", "6", "--ckpt-every", "2", "--log-every", "1",
                                 "--run-dir", str(run)])
    with pytest.raises(SystemExit) as e:
        train_vae.main(args)
    assert e.value.code == 3
    assert "non-finite loss at step 2" in (run / "log.txt").read_text()
    assert utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == 2
    assert not (run / "checkpoints" / "0000003.pt").exists()


def test_bad_input_fails_before_training(tmp_path):
    out = run_cli(["--preset", "tiny", "--data-path", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "r")])
    assert out.returncode == 2 and "--data-path" in out.stderr and "nowhere" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing written
    out = run_cli(["--preset", "tiny", "--vae", "scratch:tiny-vq", "--kl-weight", "1e-6", "--results-dir", str(tmp_path / "r")])
    assert out.returncode == 2 and "--kl-weight" in out.stderr and "VQ" in out.stderr
    from PIL import Image

    (tmp_path / "small").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "small" / "a.png")
    out = run_cli(["--preset", "tiny", "--data-path", str(tmp_path / "small"), "--results-dir", str(tmp_path / "r")])
    assert out.returncode == 2 and "a.png is smaller than the 64px crop" in out.stderr
    out = run_cli(["--preset", "tiny", "--vae", str(tmp_path / "missing.ckpt"), "--results-dir", str(tmp_path / "r")])
    assert out.returncode == 2 and "missing.ckpt" in out.stderr
    with pytest.raises(SystemExit):
        train_vae.check_args(train_vae.parse_args(["--preset", "tiny", "--global-batch-size", "3"]), world_size=2)
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--preset", "tiny", "--eq-angles", "45"])
    out = run_cli(["--preset", "tiny", "--lr", "-1", "--results-dir", str(tmp_path / "r")])
    assert out.returncode == 2 and "--lr -1.0 is out of range" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "noise.ckpt").write_bytes(bytes(range(256)) * 8)
    out = run_cli(["--preset", "tiny", "--vae", str(tmp_path / "noise.ckpt"), "--results-dir", str(tmp_path / "r")])
    assert out.returncode == 2 and "is not a PyTorch checkpoint" in out.stderr and "--trust-checkpoint" not in out.stderr
    assert not (tmp_path / "r").exists()


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
