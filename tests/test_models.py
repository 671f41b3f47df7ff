"""Autoencoders against diffusers, checkpoint formats, the VQ quantizer and the EQ transforms."""
import argparse
import io
import os
import random
import zipfile

import pytest
import torch
import torch.nn.functional as F

import models
import utils

diffusers = pytest.importorskip("diffusers")

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
