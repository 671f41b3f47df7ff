"""REPA: the DINOv2 encoder (official names, position interpolation, REPA's resample), SiT with
REPA's projectors (REPA's names), the alignment loss, images in the latent cache, and
train_dit.py --repa / sample.py through their real command lines."""
import json
import os

import numpy as np
import pytest
import timm
import torch

import data
import diffusion
import models
import utils
from test_models import official_dit_shapes
from test_train_dit import read_metrics, refusal, run_cli

# ----------------------------------------------------------------------------- DINOv2


def official_dinov2_shapes(D, depth, registers=0, patch=14, grid=37):
    """Names and shapes of a released dinov2_vit*14[_reg4]_pretrain.pth (MLP feed-forward), written out."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, grid * grid + 1, D), "mask_token": (1, D),
              "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,)}
    if registers:
        shapes["register_tokens"] = (1, registers, D)
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "ls1.gamma": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                       b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,), b + "mlp.fc2.weight": (D, 4 * D),
                       b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,)})
    return shapes


@pytest.mark.parametrize("name,registers", [("dinov2_vitb14", 0), ("dinov2_vitb14_reg", 4)])
def test_dinov2_state_dict_with_official_names_loads_strictly(tmp_path, name, registers):
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.02 * torch.randn(s, generator=g) for k, s in official_dinov2_shapes(768, 12, registers).items()}
    with torch.device("meta"):
        assert set(models.DINOv2_models[name]().state_dict()) == set(sd)
    torch.save(sd, tmp_path / "weights.pth")
    encoder = models.load_dinov2(str(tmp_path / "weights.pth"))  # the architecture read from the shapes
    assert encoder.num_register_tokens == registers and len(encoder.blocks) == 12
    assert encoder.interpolate_antialias == bool(registers) and encoder.interpolate_offset == (0.0 if registers else 0.1)
    assert torch.equal(encoder.blocks[11].ls2.gamma, sd["blocks.11.ls2.gamma"]) and not encoder.training
    out = encoder.forward_features(torch.randn(2, 3, 224, 224))
    assert out["x_norm_patchtokens"].shape == (2, 256, 768) and out["x_norm_regtokens"].shape == (2, registers, 768)
    assert out["x_prenorm"].shape == (2, 1 + registers + 256, 768)
    del sd["blocks.3.ls1.gamma"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match="blocks.3.ls1.gamma"):
        models.load_dinov2(str(tmp_path / "broken.pth"))


def test_dinov2_registry_parameter_counts():
    """The released models' sizes (counted on the official dinov2 hub models; registers add 4 x D)."""
    counts = {"dinov2_vits14": 22_056_576, "dinov2_vitb14": 86_580_480, "dinov2_vitl14": 304_368_640,
              "dinov2_vitg14": 1_136_480_768}
    for name, count in counts.items():
        for suffix, extra in (("", 0), ("_reg", 4 * models.DINOV2_SIZES[name[-3]][0])):
            with torch.device("meta"):
                model = models.DINOv2_models[name + suffix]()
            assert sum(p.numel() for p in model.parameters()) == count + extra, name + suffix


def test_dinov2_names_resolve_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path))
    monkeypatch.setattr(utils.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    assert models.dinov2_url("dinov2_vits14_reg") == url
    with pytest.raises(RuntimeError) as e:
        models.load_dinov2("dinov2_vits14_reg")
    assert url in str(e.value) and str(tmp_path / "dinov2" / "dinov2_vits14_reg4_pretrain.pth") in str(e.value)
    sd = models.DINOv2_models["dinov2_vits14_reg"]().state_dict()
    torch.save(sd, tmp_path / "dinov2" / "dinov2_vits14_reg4_pretrain.pth")
    assert torch.equal(models.load_dinov2("dinov2_vits14_reg").register_tokens, sd["register_tokens"])


def test_position_interpolation_and_token_counts():
    torch.manual_seed(0)
    encoder = models.DINOv2_models["dinov2_vits14"]().eval()
    assert encoder.interpolate_pos_encoding(37, 37) is encoder.pos_embed  # exact at the native 518-px grid
    table = encoder.interpolate_pos_encoding(16, 16)
    assert table.shape == (1, 257, 384) and torch.equal(table[:, 0], encoder.pos_embed[:, 0])
    with torch.no_grad():
        assert encoder.forward_features(torch.randn(1, 3, 224, 224))["x_norm_patchtokens"].shape == (1, 256, 384)
        with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
            encoder.forward_features(torch.randn(1, 3, 256, 256))
        # REPA's targets for 256-px images: resized to 224, 16 x 16 tokens
        images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
        assert models.encoder_targets(encoder, images, 16).shape == (2, 256, 384)
    # REPA resamples the table once with timm's resample_abs_pos_embed
    reference = timm.layers.resample_abs_pos_embed(encoder.pos_embed.detach().clone(), [16, 16])
    encoder.resample_pos_embed(16)
    torch.testing.assert_close(encoder.pos_embed.detach(), reference, rtol=0, atol=1e-6)
    assert encoder.interpolate_pos_encoding(16, 16) is encoder.pos_embed


# ----------------------------------------------------------------------------- SiT with projectors


def repa_state_dict(z_dims, projector_dim=64, seed=0):
    """REPA's SiT-T/2-sized state dict: SiT's names without the sigma half, plus `projectors.i.{0,2,4}`."""
    shapes = official_dit_shapes(4, 128, 2, input_size=8, learn_sigma=False, num_classes=10)
    for i, z in enumerate(z_dims):
        shapes.update({f"projectors.{i}.0.weight": (projector_dim, 128), f"projectors.{i}.0.bias": (projector_dim,),
                       f"projectors.{i}.2.weight": (projector_dim, projector_dim), f"projectors.{i}.2.bias": (projector_dim,),
                       f"projectors.{i}.4.weight": (z, projector_dim), f"projectors.{i}.4.bias": (z,)})
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(s, generator=g) for k, s in shapes.items()}


def test_repa_named_state_dict_loads_strictly_and_samples(tmp_path):
    sd = repa_state_dict([384, 768])
    model = models.SiT_models["SiT-T/2"](input_size=8, num_classes=10, z_dims=[384, 768], encoder_depth=2, projector_dim=64)
    model.load_state_dict(sd, strict=True)
    out, zs = model.eval()(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 4, 10]))
    assert out.shape == (3, 4, 8, 8) and [z.shape for z in zs] == [(3, 16, 384), (3, 16, 768)]
    torch.save(sd, tmp_path / "repa.pt")
    net, recipe = models.load_generator(str(tmp_path / "repa.pt"), "SiT-T/2")
    assert net.config["z_dims"] == [384, 768] and not net.learn_sigma and recipe["objective"]["time_input"] == "repa"
    objective = diffusion.make_objective(recipe["objective"], net)
    z = diffusion.generate(net, objective, diffusion.SampleNoise(0, range(2), "cpu"), torch.tensor([1, 2]), "sde", 4,
                           cfg_scale=1.8, guidance_high=0.7)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
    # a plain SiT's weights in a REPA model: the missing projectors are named
    plain = {k: v for k, v in sd.items() if not k.startswith("projectors.")}
    with pytest.raises(KeyError, match="projectors.0.0.weight"):
        models._load_strict(model, plain, "plain.pt")


def test_released_repa_generator_resolves_by_name(tmp_path, monkeypatch):
    entry = models.PRETRAINED_GENERATORS["REPA-SiT-XL/2-256"]
    assert entry["model"] == "SiT-XL/2" and entry["repa"] == dict(z_dims=[768], encoder_depth=8, projector_dim=2048)
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path))
    monkeypatch.setitem(models.PRETRAINED_GENERATORS, "REPA-SiT-T/2-64", dict(
        model="SiT-T/2", image_size=64, filename="repa-t.pt", url="https://example.invalid/repa-t.pt",
        repa=dict(z_dims=[384], encoder_depth=2, projector_dim=64)))
    sd = repa_state_dict([384])
    sd["y_embedder.embedding_table.weight"] = torch.randn(1001, 128)
    os.makedirs(tmp_path / "generators")
    torch.save({"ema": sd}, tmp_path / "generators" / "repa-t.pt")
    model, recipe = models.load_generator("REPA-SiT-T/2-64")
    assert torch.equal(model.projectors[0][4].bias, sd["projectors.0.4.bias"])
    assert recipe == models.released_recipe("SiT-T/2", 64, repa=True)


def test_alignment_loss_values_and_where_its_gradient_goes():
    torch.manual_seed(0)
    target = torch.randn(2, 16, 32)
    scale = torch.rand(2, 16, 1) + 0.5
    torch.testing.assert_close(diffusion.alignment_loss([target * scale], [target]), torch.full((2,), -1.0))
    a, b = torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)
    a[..., 0], b[..., 1] = 1.0, 3.0
    torch.testing.assert_close(diffusion.alignment_loss([a, a], [b, -a]), torch.tensor([0.5]))  # mean of 0 and 1
    model = models.SiT_models["SiT-T/2"](input_size=8, num_classes=10, z_dims=[32], encoder_depth=2, projector_dim=64)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn_like(p))  # adaLN-Zero would otherwise block every gradient
    _, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    diffusion.alignment_loss(zs, [target]).sum().backward()
    reached = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
               for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {"x_embedder", "t_embedder", "y_embedder", "blocks.0", "blocks.1", "projectors"}


# ----------------------------------------------------------------------------- the cache and the CLI


@pytest.fixture(scope="module")
def repa_run(tmp_path_factory):
    """A tiny REPA run that builds a cache with images: 4 steps, a sample grid."""
    root = tmp_path_factory.mktemp("repa")
    out = run_cli(["--preset", "tiny-repa", "--latents", str(root / "latents"), "--cache-shard-size", "10",
                   "--run-dir", str(root / "run")])
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_cache_keeps_the_exact_images_flipped_with_their_latents(repa_run):
    cache = repa_run / "latents"
    meta = data.read_cache_meta(str(cache))
    assert meta["images"] is True
    images = np.concatenate([np.load(cache / f"images-{k:05d}.npy") for k in range(4)])
    assert images.shape == (32, 3, 32, 32) and images.dtype == np.uint8
    shapes = data.ShapesDataset(32, 32)
    for i in (0, 17, 31):
        x = shapes[i][0]  # [-1, 1] floats made from the rendered uint8 image
        assert np.array_equal(images[i], data.to_uint8_images(x).numpy())
        torch.testing.assert_close(images[i].astype(np.float32) / 127.5 - 1, x.numpy(), rtol=0, atol=1e-6)
    dataset = data.LatentDataset(str(cache), flip=True, seed=0, images=True)
    moments_all = np.concatenate([np.load(cache / f"moments-{k:05d}.npy") for k in range(4)])
    flips = set()
    for i in range(12):
        moments, image, label = dataset[i]
        flipped = not np.array_equal(image.numpy(), images[i])
        assert np.array_equal(image.numpy(), images[i][:, :, ::-1] if flipped else images[i]) and label == i % 10
        assert np.array_equal(moments.numpy(), moments_all[i, int(flipped)].astype(np.float32))
        flips.add(flipped)
    assert flips == {True, False}


def test_tiny_repa_run_logs_alignment_saves_its_recipe_and_samples(repa_run):
    run = repa_run / "run"
    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4] and all(np.isfinite(r["train/loss_proj"]) for r in records)
    assert all(-1 <= r["train/loss_proj"] <= 1 for r in records)
    assert (run / "samples-0000004.png").is_file() and "--encoder random" in (run / "log.txt").read_text()
    ckpt = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    recipe = ckpt["generator"]
    assert recipe["repa"] == dict(encoder="random", proj_coeff=0.5) and recipe["objective"]["time_input"] == "repa"
    assert recipe["config"]["z_dims"] == [384] and recipe["config"]["encoder_depth"] == 2
    assert ckpt["args"]["grad_clip"] == 1.0 and ckpt["args"]["learn_sigma"] is None and ckpt["args"]["flip"] is False
    # a size preset and REPA's sampler recipe combine: the recipe's sampler and guidance, the preset's step count
    out = run_cli(["--preset", "tiny", "--recipe", "repa", "--ckpt", str(run / "checkpoints" / "latest.pt"),
                   "--num-samples", "4", "--per-proc-batch-size", "2", "--sample-dir", str(repa_run / "samples")],
                  script="sample.py")
    assert out.returncode == 0, out.stderr[-3000:]
    settings = json.loads((repa_run / "samples" / "settings.json").read_text())
    assert (settings["sampler"], settings["num_steps"], settings["cfg_scale"], settings["guidance_high"]) == ("sde", 4, 1.8, 0.7)
    with np.load(repa_run / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 32, 32, 3) and f["arr_0"].dtype == np.uint8


def test_repa_resume_on_two_processes_equals_the_uninterrupted_run(repa_run, tmp_path, capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--preset", "tiny-repa", "--latents", str(repa_run / "latents"), "--max-steps", "4", "--ckpt-every", "2",
              "--sample-every", "0", "--global-batch-size", "8"]
    out = run_cli([*common, "--run-dir", str(full)], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    (resumed / "checkpoints").mkdir(parents=True)
    os.link(full / "checkpoints" / "0000002.pt", resumed / "checkpoints" / "0000002.pt")
    out = run_cli([*common, "--resume", str(resumed / "checkpoints" / "0000002.pt")], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    a = utils.load_checkpoint(str(full / "checkpoints" / "0000004.pt"))
    b = utils.load_checkpoint(str(resumed / "checkpoints" / "0000004.pt"))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert read_metrics(full)[-1]["train/loss_proj"] == read_metrics(resumed)[-1]["train/loss_proj"]
    code, err = refusal(["--resume", str(full), "--encoder-depth", "3", "--max-steps", "5"], capsys)
    assert code == 2 and "--encoder-depth 3" in err


def test_repa_refuses_a_cache_without_images_and_starts_fresh_projectors(repa_run, tmp_path, capsys):
    plain = tmp_path / "plain"
    out = run_cli(["--preset", "tiny", "--model", "SiT-T/2", "--no-learn-sigma", "--latents", str(plain / "latents"),
                   "--max-steps", "1", "--sample-every", "0", "--run-dir", str(plain / "run")])
    assert out.returncode == 0, out.stderr[-3000:]
    code, err = refusal(["--preset", "tiny-repa", "--latents", str(plain / "latents"), "--run-dir", str(tmp_path / "no")], capsys)
    assert code == 2 and "--cache-images" in err and not (tmp_path / "no").exists()
    code, err = refusal(["--preset", "tiny-repa", "--encoder", "dinov2_vitq14", "--latents", str(tmp_path / "x"),
                        "--run-dir", str(tmp_path / "no")], capsys)
    assert code == 2 and "dinov2_vitq14" in err and not (tmp_path / "x").exists()
    code, err = refusal(["--preset", "tiny", "--repa", "--latents", str(tmp_path / "x"), "--run-dir", str(tmp_path / "no")], capsys)
    assert code == 2 and "SiT" in err
    # a plain SiT's weights start a REPA run; the projectors start fresh, and the log says so
    run = tmp_path / "from-plain"
    out = run_cli(["--preset", "tiny-repa", "--latents", str(repa_run / "latents"), "--max-steps", "1", "--lr", "0",
                   "--sample-every", "0", "--init-from", str(plain / "run" / "checkpoints" / "latest.pt"),
                   "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no REPA projectors: they start fresh" in (run / "log.txt").read_text()
    # ... and keep SiT's time input (t = 1 at the data), here and after a resume: REPA's would reverse it
    assert "trained with SiT's time input: the run keeps it" in (run / "log.txt").read_text()
    assert utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["generator"]["objective"]["time_input"] == "sit"
    out = run_cli(["--resume", str(run), "--max-steps", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["generator"]["objective"]["time_input"] == "sit"
    code, err = refusal(["--preset", "tiny-repa", "--latents", str(repa_run / "latents"), "--learn-sigma", "--init-from",
                        str(plain / "run" / "checkpoints" / "latest.pt"), "--run-dir", str(tmp_path / "no")], capsys)
    assert code == 2 and "pass --no-learn-sigma" in err and not (tmp_path / "no").exists()
    a = utils.load_checkpoint(str(plain / "run" / "checkpoints" / "latest.pt"))["ema"]
    b = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("projectors.") for k in b)
