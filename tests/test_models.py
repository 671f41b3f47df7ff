"""Autoencoders against diffusers, checkpoint formats, the VQ quantizer, the EQ transforms, and the
DiT/SiT backbone against the official parameter names, counts and formulas."""
import argparse
import io
import math
import os
import random
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
import utils

try:
    import diffusers
except ImportError:
    diffusers = None
# only the comparisons with diffusers need it; the transforms, VQ and DiT tests run without it
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers (requirements-dev.txt) is the reference here")

# a small model with LDM's 32 norm groups: bare state dicts carry no group count, so they load as 32
SMALL = dict(models.AE_configs["tiny"], ch=32, norm_groups=32)


def diffusers_kl(config):
    """diffusers' AutoencoderKL with the architecture of one of our configs."""
    levels = range(len(config["ch_mult"]))
    res = config.get("resolution", 256)
    attn = [res // 2**i in config["attn_resolutions"] for i in levels]
    return diffusers.AutoencoderKL(
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        block_out_channels=[config["ch"] * m for m in config["ch_mult"]],
        layers_per_block=config["num_res_blocks"], latent_channels=config["embed_dim"], sample_size=res,
        use_quant_conv=config["use_quant_conv"], use_post_quant_conv=config["use_quant_conv"],
        norm_num_groups=config.get("norm_groups", 32))


def assert_same_outputs(ours, theirs, x):
    """Posterior mean/logvar and decoder output of our model and diffusers' agree (float64)."""
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = x.double()
    with torch.no_grad():
        d_post = theirs.encode(x).latent_dist
        o_post = ours.encode(x)
        torch.testing.assert_close(o_post.mean, d_post.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o_post.logvar, d_post.logvar, rtol=1e-5, atol=1e-5)
        z = d_post.mean
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-5, atol=1e-5)


@needs_diffusers
@pytest.mark.parametrize("name", ["kl-f8", "kl-f8-c16"])
def test_kl_matches_diffusers_both_directions(name, tmp_path):
    torch.manual_seed(0)
    theirs = diffusers_kl(models.AE_configs[name])
    with torch.no_grad():  # non-trivial norms and biases so a swapped key would show
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "hf")
    x = torch.randn(1, 3, 32, 32)
    # diffusers -> ours
    ours = models.load_autoencoder(str(tmp_path / "hf"))
    assert ours.config["use_quant_conv"] == models.AE_configs[name]["use_quant_conv"]
    assert ours.latent_channels == models.AE_configs[name]["embed_dim"]
    assert_same_outputs(ours, theirs, x)
    # ours -> diffusers
    models.export_diffusers(ours.float(), tmp_path / "export")
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export")
    assert_same_outputs(ours, reloaded, x)


@needs_diffusers
def test_ldm_ckpt_and_diffusers_give_identical_outputs(tmp_path):
    """An SD-VAE-shaped checkpoint in LDM .ckpt form and in diffusers form give diffusers' outputs."""
    torch.manual_seed(1)
    theirs = diffusers_kl(models.AE_configs["kl-f8"])
    theirs.save_pretrained(tmp_path / "hf")
    from_hf = models.load_autoencoder(str(tmp_path / "hf"))
    ldm_state = {k: v.clone() for k, v in from_hf.state_dict().items()}
    ldm_state["loss.logvar"] = torch.tensor(0.3)
    ldm_state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    torch.save({"state_dict": ldm_state, "global_step": 7}, tmp_path / "model.ckpt")
    from_ldm, extras = models.load_autoencoder(str(tmp_path / "model.ckpt"), return_extras=True)
    assert set(extras) == {"loss.logvar", "loss.discriminator.main.0.weight"}
    assert from_ldm.scaling_factor == 0.18215  # the SD-VAE convention for a bare LDM kl-f8
    x = torch.randn(1, 3, 32, 32)
    assert_same_outputs(from_ldm, theirs, x)
    assert_same_outputs(from_hf, theirs, x)


def test_bare_diffusers_safetensors_and_our_format_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    model = models.build_autoencoder(SMALL).eval()
    save_file({k: v.contiguous() for k, v in models.ours_to_diffusers(model).items()}, tmp_path / "vae.safetensors")
    models.save_autoencoder(model, tmp_path / "ours.pt")
    x = torch.randn(2, 3, 64, 64)
    for path in ("vae.safetensors", "ours.pt"):
        loaded = models.load_autoencoder(str(tmp_path / path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x).mean, model.encode(x).mean)
            torch.testing.assert_close(loaded.decode(model.encode(x).mean), model.decode(model.encode(x).mean))


def test_strict_loading_lists_missing_and_unexpected(tmp_path):
    model = models.build_autoencoder(SMALL)
    sd = model.state_dict()
    sd.pop("decoder.conv_out.bias")
    sd["decoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(KeyError) as e:
        models.load_autoencoder(str(tmp_path / "broken.pt"))
    assert "missing keys (1): decoder.conv_out.bias" in str(e.value)
    assert "unexpected keys (1): decoder.extra.weight" in str(e.value)


@needs_diffusers
def test_diffusers_strict_conversion_names_the_key(tmp_path):
    theirs = diffusers_kl(models.AE_configs["tiny"])
    theirs.save_pretrained(tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "hf" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd.pop("decoder.up_blocks.0.resnets.0.conv1.weight")
    save_file(sd, weights)
    with pytest.raises(KeyError, match=r"decoder\.up\.2\.block\.0\.conv1\.weight \(diffusers: decoder\.up_blocks\.0\.resnets\.0\.conv1\.weight\)"):
        models.load_autoencoder(str(tmp_path / "hf"))


def test_weights_only_refusal_names_the_flag(tmp_path):
    model = models.build_autoencoder(SMALL)
    torch.save({"state_dict": model.state_dict(), "hparams": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.ckpt")
    with pytest.raises(RuntimeError, match="--trust-checkpoint"):
        models.load_autoencoder(str(tmp_path / "pickled.ckpt"))
    loaded = models.load_autoencoder(str(tmp_path / "pickled.ckpt"), trust_checkpoint=True)
    assert torch.equal(loaded.decoder.conv_out.weight, model.decoder.conv_out.weight)


def test_pretrained_names_resolve_to_cached_files(tmp_path, monkeypatch):
    """Names resolve through the cache dir; files already in place are used without any network."""
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path))

    def no_network(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(utils.urllib.request, "urlopen", no_network)
    model = models.build_autoencoder(dict(SMALL, scaling_factor=0.5))
    models.export_diffusers(model, tmp_path / "sd-vae-ft-ema")
    assert models.load_autoencoder("sd-vae-ft-ema").scaling_factor == 0.5
    # an LDM release zip in place is unpacked once to model.ckpt
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buf)
    os.makedirs(tmp_path / "kl-f8")
    with zipfile.ZipFile(tmp_path / "kl-f8" / "kl-f8.zip", "w") as z:
        z.writestr("model.ckpt", buf.getvalue())
    loaded = models.load_autoencoder("kl-f8")
    assert torch.equal(loaded.encoder.conv_in.weight, model.encoder.conv_in.weight)
    assert (tmp_path / "kl-f8" / "model.ckpt").is_file()
    # a missing file: the error names the URL and where to put the file
    with pytest.raises(RuntimeError) as e:
        models.load_autoencoder("vq-f16-1024")
    assert models.PRETRAINED_AUTOENCODERS["vq-f16-1024"]["url"] in str(e.value)
    assert str(tmp_path / "vq-f16-1024" / "last.ckpt") in str(e.value)


def test_published_names_load_without_collectives_and_local_copies_win(tmp_path, monkeypatch):
    """A name in the cache loads without any barrier (trainers load it on rank 0 alone, and a
    collective there hung every 2-process run); a local folder of that name is used as it is, not
    replaced by the download; damaged files name themselves and the fix."""
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(utils, "barrier", lambda: pytest.fail("a collective inside a loader"))
    monkeypatch.setattr(utils.urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download expected"))
    model = models.build_autoencoder(dict(SMALL, scaling_factor=0.5))
    models.export_diffusers(model, tmp_path / "cache" / "sd-vae-ft-ema")
    assert models.load_autoencoder("sd-vae-ft-ema").scaling_factor == 0.5
    monkeypatch.chdir(tmp_path)
    models.export_diffusers(models.build_autoencoder(dict(SMALL, scaling_factor=0.25)), "eq-vae")
    assert models.load_autoencoder("eq-vae").scaling_factor == 0.25
    assert (tmp_path / "eq-vae" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == utils.shared_mode()
    weights = tmp_path / "eq-vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="not a readable safetensors file"):
        models.load_autoencoder("eq-vae")
    (tmp_path / "eq-vae" / "config.json").write_text("<html>")
    with pytest.raises(ValueError, match="config.json is not a readable diffusers AutoencoderKL config"):
        models.load_autoencoder("eq-vae")


def test_ldm_ema_counters_are_dropped():
    """SD's LDM-format "ema-pruned" VAE files keep LitEma's decay and num_updates: they load."""
    model = models.build_autoencoder(SMALL)
    sd = dict(model.state_dict(), **{"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(5)})
    loaded, extras, _ = models._split_state({"state_dict": sd})
    assert set(loaded) == set(model.state_dict()) and extras == {}


@needs_diffusers
def test_registry_parameter_counts_match_published_architectures():
    """Built on the meta device: SD-VAE and SD3-VAE counts as published; kl-f16 and the taming
    VQGAN equal diffusers' equivalent architectures."""
    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        ours = {name: count(models.build_autoencoder(c)) for name, c in models.AE_configs.items()}
        kl_f16 = count(diffusers_kl(models.AE_configs["kl-f16-c16"]))
        vq = count(diffusers.VQModel(
            down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 128, 256, 256, 512], layers_per_block=2, latent_channels=256,
            num_vq_embeddings=1024, vq_embed_dim=256))
    assert ours["kl-f8"] == 83_653_863  # stabilityai/sd-vae-ft-ema
    assert ours["kl-f8-c16"] == 83_819_683  # SD3 VAE
    assert ours["kl-f16-c16"] == kl_f16
    assert ours["vq-f16-1024"] == vq


def test_tiny_models_forward_shapes():
    x = torch.randn(2, 3, 64, 64)
    kl = models.build_autoencoder(models.AE_configs["tiny"])
    rec, post = kl(x)
    assert rec.shape == x.shape and post.mean.shape == (2, 4, 16, 16) and post.kl().shape == (2,)
    vq = models.build_autoencoder(models.AE_configs["tiny-vq"])
    rec, loss, idx = vq(x)
    assert rec.shape == x.shape and idx.shape == (2, 16, 16) and loss.ndim == 0
    disc = models.NLayerDiscriminator()
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


# ----------------------------------------------------------------------------- VQ


def test_quantizer_picks_nearest_code_and_passes_gradients():
    torch.manual_seed(0)
    vq = models.build_autoencoder(models.AE_configs["tiny-vq"])
    x = torch.randn(2, 3, 64, 64)
    h = vq.encode_features(x)
    zq, loss, idx = vq.quantize_features(h)
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    brute = torch.cdist(flat, vq.quantize.embedding.weight).argmin(1)
    assert torch.equal(idx.flatten(), brute)
    torch.testing.assert_close(zq, vq.quantize.embedding.weight[idx].permute(0, 3, 1, 2))
    # the VQ loss in taming's legacy form: beta * codebook + commitment, equal values for both terms
    mse = F.mse_loss(zq.detach(), h.detach())
    torch.testing.assert_close(loss, (1 + vq.quantize.beta) * mse)
    # straight-through: the reconstruction gradient reaches the encoder
    vq.decode(zq).mean().backward()
    assert vq.encoder.conv_in.weight.grad is not None and vq.encoder.conv_in.weight.grad.abs().sum() > 0
    with torch.no_grad():
        # zq = h + (e - h).detach() equals the code up to float rounding
        torch.testing.assert_close(vq.decode_indices(idx), vq.decode(zq), rtol=1e-4, atol=1e-4)
        codes = vq.quantize.embedding.weight[idx].permute(0, 3, 1, 2)
        assert torch.equal(vq.decode_indices(idx), vq.decode(codes))


def test_nearest_code_search_runs_without_tf32_and_restores_the_setting(monkeypatch):
    """The trainers switch TF32 on for GPU matmuls; the code search turns it off for its product
    (TF32 picks other codes for some features) and puts the caller's setting back."""
    vq = models.build_autoencoder(models.AE_configs["tiny-vq"])
    seen, transpose = [], torch.Tensor.t
    monkeypatch.setattr(torch.Tensor, "t", lambda self: seen.append(torch.backends.cuda.matmul.allow_tf32) or transpose(self))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    vq.quantize_features(torch.randn(1, vq.latent_channels, 4, 4))
    assert seen == [False] and torch.backends.cuda.matmul.allow_tf32


# ----------------------------------------------------------------------------- transforms


def box_encoder(x, f=4):
    return F.avg_pool2d(x, f)


def test_four_quarter_turns_are_identity():
    x = torch.randn(1, 3, 32, 24)
    t = models.EqTransform(1, 8, 6, 8, 6)
    y = x
    for _ in range(4):
        y = models.apply_eq_transform(y, models.EqTransform(1, y.shape[-2] // 4, y.shape[-1] // 4, y.shape[-2] // 4, y.shape[-1] // 4))
    assert torch.equal(x, y)
    assert models.apply_eq_transform(x, t).shape == (1, 3, 24, 32)


@pytest.mark.parametrize("lat", [(8, 8), (7, 7), (8, 6), (5, 9)])
@pytest.mark.parametrize("mode", models.EQ_MODES)
def test_sampled_transform_sizes_are_consistent(lat, mode):
    """For odd/even and non-square latents, tau(x) is always f times tau(z) for every mode."""
    rng = random.Random(0)
    f = 8
    z = torch.randn(1, 4, *lat)
    x = torch.randn(1, 3, lat[0] * f, lat[1] * f)
    seen_k, seen_scales = set(), set()
    for _ in range(40):
        t = models.sample_eq_transform(*lat, mode=mode, rng=rng)
        tz, tx = models.apply_eq_transform(z, t), models.apply_eq_transform(x, t)
        assert tx.shape[-2:] == (tz.shape[-2] * f, tz.shape[-1] * f)
        seen_k.add(t.k)
        seen_scales.add(t.scale)
        assert all(0.2 <= s <= 1.0 for s in t.scale)
    assert seen_k == ({1, 2, 3} if mode.startswith("rotation") else {0})
    if mode == "rotation":
        assert seen_scales == {(1.0, 1.0)}
    else:
        assert all(s < 1.0 for pair in seen_scales for s in pair)
        anisotropic = any(abs(a - b) > 0.2 for a, b in seen_scales)
        assert anisotropic == mode.endswith("anisotropic")


def test_discrete_scale_set_and_grid():
    assert models.scale_grid(32) == list(range(8, 32))  # the official code's 8/32 ... 31/32
    rng = random.Random(0)
    scales = {models.sample_eq_transform(32, 32, "rotation+scale", scales=(0.25, 0.5, 0.75), rng=rng).new_h for _ in range(60)}
    assert scales == {8, 16, 24}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_box_encoder_is_exactly_equivariant_to_rotations(k):
    x = torch.randn(2, 3, 32, 32)
    t = models.eq_transform(8, 8, k=k)
    a = models.apply_eq_transform(box_encoder(x), t)
    b = box_encoder(models.apply_eq_transform(x, t))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # only the float summation order differs
    assert not torch.allclose(a, box_encoder(x))


@pytest.mark.parametrize("scale,k", [(0.5, 0), (0.25, 0), (0.5, 1), (0.25, 3)])
def test_box_encoder_is_exactly_equivariant_to_box_scaling(scale, k):
    """With the box filter (`area`), scaling by n/latent_side commutes with the box encoder exactly
    wherever the box windows align: n dividing the latent side."""
    x = torch.randn(2, 3, 32, 32)
    t = models.eq_transform(8, 8, k=k, scale=scale)
    a = models.apply_eq_transform(box_encoder(x), t, interp="area")
    b = box_encoder(models.apply_eq_transform(x, t, interp="area"))
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_smooth_images_are_nearly_equivariant_at_every_grid_scale():
    """On smooth images every grid scale with bicubic nearly commutes with the box encoder, and a
    half-pixel misalignment (a plausible bug) would be caught."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    x = torch.stack([torch.sin(3 * xx + 2 * yy), torch.cos(2 * xx - yy), xx * yy])[None]
    for n in models.scale_grid(16):
        t = models.eq_transform(16, 16, k=1, scale=n / 16)
        a = models.apply_eq_transform(box_encoder(x), t)
        b = box_encoder(models.apply_eq_transform(x, t))
        assert (a - b).norm() / b.norm() < 0.05
        shifted = torch.roll(b, 1, dims=-1)
        assert (a - shifted).norm() / b.norm() > 0.2


# ----------------------------------------------------------------------------- DiT / SiT

# (depth, hidden size, heads) of the DiT paper's Table 1; T is ours, for CPU tests
PAPER_SIZES = {"T": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def official_dit_shapes(depth, D, p, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000):
    """Parameter names and shapes of the official DiT/SiT models.py (timm Attention and Mlp,
    adaLN-Zero, a 256-dim frequency input to the timestep MLP, a null-class row), written out."""
    out = p * p * in_channels * (2 if learn_sigma else 1)
    shapes = {
        "pos_embed": (1, (input_size // p) ** 2, D),
        "x_embedder.proj.weight": (D, in_channels, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    shapes.update({
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
        "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
    })
    return shapes


def official_state_dict(name, seed=0, **kwargs):
    """Random tensors under the official names and shapes for a registry name like "DiT-S/2"."""
    size, p = name.split("-")[1].split("/")
    depth, D, _ = PAPER_SIZES[size]
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, shape in official_dit_shapes(depth, D, int(p), **kwargs).items()}


def random_dit(name="DiT-T/2", seed=0, **kwargs):
    """A registry model on 8x8 latents with every trainable weight random (the init zeroes adaLN
    and the output layer, which would make every output 0), in eval mode."""
    torch.manual_seed(seed)
    model = models.build_generator(name, **{"input_size": 8, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


def test_generator_registry_parameter_counts():
    """Every DiT_models/SiT_models entry builds on the meta device with the count of the official
    parameter list (input 32, 1000 classes, learned sigma). DiT-XL/2 has the official 675,129,632
    (pos_embed included); without the frozen pos_embed, S/2, B/2, L/2, XL/2 round to the paper's
    33M, 130M, 458M, 675M (with it B/2 is 130.5M)."""
    assert set(models.DiT_models) == {f"DiT-{s}/{p}" for s in PAPER_SIZES for p in (1, 2, 4, 8)}
    assert set(models.SiT_models) == {f"SiT-{s}/{p}" for s in PAPER_SIZES for p in (1, 2, 4, 8)}
    trainable = {}
    with torch.device("meta"):
        for name, constructor in {**models.DiT_models, **models.SiT_models}.items():
            model = constructor()
            size, p = name.split("-")[1].split("/")
            depth, D, heads = PAPER_SIZES[size]
            expected = sum(math.prod(s) for s in official_dit_shapes(depth, D, int(p)).values())
            assert sum(q.numel() for q in model.parameters()) == expected, name
            assert model.blocks[0].attn.num_heads == heads and len(model.blocks) == depth
            trainable[name] = sum(q.numel() for q in model.parameters() if q.requires_grad)
    assert sum(math.prod(s) for s in official_dit_shapes(28, 1152, 2).values()) == 675_129_632
    for name, millions in {"S/2": 33, "B/2": 130, "L/2": 458, "XL/2": 675}.items():
        assert round(trainable[f"DiT-{name}"] / 1e6) == millions == round(trainable[f"SiT-{name}"] / 1e6)


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "SiT-S/2"])
def test_official_state_dict_loads_strictly(name):
    """A state dict with exactly the official names and shapes (input 32) loads with strict=True and
    every tensor lands under its name; a shape off by one row is refused. DiT-B/4 is checked on the
    meta device (names and shapes only)."""
    if name == "DiT-B/4":
        with torch.device("meta"):
            model = models.build_generator(name, input_size=32)
            sd = {k: torch.empty(s) for k, s in official_dit_shapes(12, 768, 4).items()}
        model.load_state_dict(sd, strict=True)
    else:
        model = models.build_generator(name, input_size=32)
        sd = official_state_dict(name)
        model.load_state_dict(sd, strict=True)
        ours = model.state_dict()
        assert all(torch.equal(ours[k], v) for k, v in sd.items())
    bad = dict(sd, **{"y_embedder.embedding_table.weight": sd["y_embedder.embedding_table.weight"][:-1]})
    with pytest.raises(RuntimeError, match="y_embedder.embedding_table.weight"):
        model.load_state_dict(bad, strict=True)


def test_load_generator_reads_official_pt_files(tmp_path):
    """load_generator on an official .pt: the architecture comes from --model, input size, sigma
    channels and class count from the shapes (all non-default here), the recipe is the official
    one; without --model the error names the flag; {"ema", "model"} loads "ema"."""
    sd = official_state_dict("DiT-S/2", input_size=16, learn_sigma=False, num_classes=10)
    torch.save(sd, tmp_path / "official.pt")
    model, recipe = models.load_generator(str(tmp_path / "official.pt"), model_name="DiT-S/2")
    assert {k: model.config[k] for k in ("input_size", "learn_sigma", "num_classes", "family", "depth", "hidden_size")} == dict(
        input_size=16, learn_sigma=False, num_classes=10, family="dit", depth=12, hidden_size=384)
    assert torch.equal(model.blocks[11].mlp.fc2.weight, sd["blocks.11.mlp.fc2.weight"])
    assert recipe == models.released_recipe("DiT-S/2", 128) and recipe["objective"]["kind"] == "diffusion"
    with pytest.raises(ValueError, match="--model"):
        models.load_generator(str(tmp_path / "official.pt"))
    # a training checkpoint: the EMA weights, SiT's recipe
    ema, raw = official_state_dict("SiT-T/2", seed=1, input_size=8), official_state_dict("SiT-T/2", seed=2, input_size=8)
    torch.save({"model": raw, "ema": ema, "opt": {}}, tmp_path / "train.pt")
    model, recipe = models.load_generator(str(tmp_path / "train.pt"), model_name="SiT-T/2")
    assert torch.equal(model.final_layer.linear.weight, ema["final_layer.linear.weight"])
    assert model.family == "sit" and recipe["objective"] == dict(kind="transport", path="linear", prediction="velocity", time_input="sit")
    # --no-ema (use_ema=False) takes the raw weights, as it does for our checkpoints
    model, _ = models.load_generator(str(tmp_path / "train.pt"), model_name="SiT-T/2", use_ema=False)
    assert torch.equal(model.final_layer.linear.weight, raw["final_layer.linear.weight"])


def test_pretrained_generator_names_resolve_through_the_cache(tmp_path, monkeypatch):
    """Offline, a released name fails with the URL and the path to place the file at; a file already
    at that path is loaded by name without any network (a DiT-T/2-sized fake registry entry)."""
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path))
    attempts = []

    def no_network(*a, **k):
        attempts.append(a)
        raise OSError("offline")

    monkeypatch.setattr(utils.urllib.request, "urlopen", no_network)
    with pytest.raises(RuntimeError) as e:
        models.load_generator("DiT-XL/2-256")
    assert models.PRETRAINED_GENERATORS["DiT-XL/2-256"]["url"] in str(e.value)
    assert str(tmp_path / "generators" / "DiT-XL-2-256x256.pt") in str(e.value)
    attempts.clear()
    monkeypatch.setitem(models.PRETRAINED_GENERATORS, "DiT-T/2-64", dict(
        model="DiT-T/2", image_size=64, filename="DiT-T-2-64x64.pt", url="https://example.invalid/DiT-T-2-64x64.pt"))
    sd = official_state_dict("DiT-T/2", input_size=8)
    torch.save(sd, tmp_path / "generators" / "DiT-T-2-64x64.pt")
    model, recipe = models.load_generator("DiT-T/2-64")
    assert attempts == []
    assert torch.equal(model.pos_embed, sd["pos_embed"]) and torch.equal(model.blocks[3].attn.qkv.bias, sd["blocks.3.attn.qkv.bias"])
    assert recipe == models.released_recipe("DiT-T/2", 64)


@pytest.mark.parametrize("name", ["DiT-T/2", "SiT-T/2"])
def test_forward_with_cfg_against_two_plain_forwards(name):
    """forward_with_cfg on [x, x] with labels [y, null]: scale 1 gives the conditional output;
    scale s gives uncond + s (cond - uncond) on the latent channels of both halves, computed from
    two plain forwards, each half keeping its own variance channels (DiT); cfg_channels=3 guides
    channels 0..2 only (the official DiT/SiT), channel 3 stays conditional."""
    model = random_dit(name, num_classes=10)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 7])
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        def cfg(scale, channels=None):
            return model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), scale, channels)
        close = dict(rtol=1e-4, atol=1e-5)
        assert cond.shape[1] == (8 if model.family == "dit" else 4)
        torch.testing.assert_close(cfg(1.0)[:2], cond, **close)
        guided = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
        assert (guided - cond[:, :4]).abs().max() > 1e-2
        out = cfg(4.0)
        torch.testing.assert_close(out[:2, :4], guided, **close)
        torch.testing.assert_close(out[2:, :4], guided, **close)
        torch.testing.assert_close(out[:2, 4:], cond[:, 4:], **close)
        torch.testing.assert_close(out[2:, 4:], uncond[:, 4:], **close)
        out3 = cfg(4.0, 3)
        torch.testing.assert_close(out3[:2, :3], guided[:, :3], **close)
        torch.testing.assert_close(out3[:2, 3:], cond[:, 3:], **close)


def test_dropped_labels_use_the_null_class():
    """LabelEmbedder: forced drops and train-mode dropout (probability 1) map to row num_classes of
    the table; eval mode never drops; no null row without dropout (the official tables). Through
    the model: with dropout 1, train-mode outputs ignore the label, eval-mode ones do not."""
    emb = models.LabelEmbedder(10, 16, 0.1)
    table = emb.embedding_table.weight
    assert table.shape == (11, 16)
    labels = torch.tensor([3, 5, 9])
    assert torch.equal(emb(labels, False, force_drop_ids=torch.tensor([1, 0, 1])), table[[10, 5, 10]])
    always = models.LabelEmbedder(10, 16, 1.0)
    assert torch.equal(always(labels, True), always.embedding_table.weight[[10, 10, 10]])
    assert torch.equal(always(labels, False), always.embedding_table.weight[labels])
    never = models.LabelEmbedder(10, 16, 0.0)
    assert never.embedding_table.weight.shape == (10, 16) and torch.equal(never(labels, True), never.embedding_table.weight[labels])
    model = random_dit(num_classes=10, class_dropout_prob=1.0)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([100])
    with torch.no_grad():
        model.train()
        assert torch.equal(model(x, t, torch.tensor([3])), model(x, t, torch.tensor([7])))
        assert torch.equal(model(x, t, torch.tensor([3])), model(x, t, torch.tensor([10])))
        model.eval()
        assert (model(x, t, torch.tensor([3])) - model(x, t, torch.tensor([7]))).abs().max() > 1e-3


def mae_pos_embed(D, G):
    """MAE's 2-D sin-cos table written out in numpy: token k = row * G + col; channels [0, D/2)
    encode the column, [D/2, D) the row; in each half sin(pos * omega) then cos(pos * omega),
    omega_i = 1 / 10000^(2i / (D/2)), i < D/4."""
    d = D // 2
    omega = 1.0 / 10000 ** (2 * np.arange(d // 2) / d)
    out = np.zeros((G * G, D))
    for row in range(G):
        for col in range(G):
            out[row * G + col] = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    return out


@pytest.mark.parametrize("name,input_size", [("DiT-T/2", 8), ("DiT-T/2", 16), ("SiT-T/4", 8)])
def test_pos_embed_is_the_mae_sincos_table(name, input_size):
    """The fixed positional table equals MAE's formula (computed independently), is frozen and is
    saved under the official name."""
    model = models.build_generator(name, input_size=input_size)
    G = input_size // model.patch_size
    np.testing.assert_allclose(model.pos_embed[0].numpy(), mae_pos_embed(128, G), rtol=0, atol=1e-6)
    assert not model.pos_embed.requires_grad and "pos_embed" in model.state_dict()
    np.testing.assert_allclose(models.sincos_pos_embed_2d(96, 5).numpy(), mae_pos_embed(96, 5), rtol=0, atol=1e-6)


def test_sit_output_is_the_first_half_of_dit():
    """SiT's forward returns in_channels channels even with learn_sigma (its checkpoint keeps the
    sigma weights), equal to the first half of a DiT with the same weights."""
    dit = random_dit("DiT-T/2")
    sit = models.build_generator("SiT-T/2", input_size=8).eval()
    sit.load_state_dict(dit.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([2, 999])
    with torch.no_grad():
        d, s = dit(x, t, y), sit(x, t, y)
    assert d.shape == (2, 8, 8, 8) and s.shape == (2, 4, 8, 8)
    assert torch.equal(s, d[:, :4])
    assert (d[:, 4:] - d[:, :4]).abs().max() > 1e-3  # the halves differ, so the slice is the right one
    assert models.build_generator("SiT-T/2", input_size=8, learn_sigma=False).final_layer.linear.out_features == 2 * 2 * 4


def test_a_maskgit_checkpoint_given_as_a_dit_is_named():
    with pytest.raises(ValueError, match="is a train_maskgit.py checkpoint .MaskGIT-T., not a DiT/SiT one"):
        models.maskgit_from_checkpoint({"maskgit": {"model": "MaskGIT-T"}, "model": {}}, "run.pt", "DiT-T/2")
