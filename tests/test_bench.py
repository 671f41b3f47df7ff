"""bench.py's DiT benchmarks run and report sane numbers; the official-code hook imports a clone
without shadowing our models.py and diffusion.py."""
import argparse
import sys
import textwrap

import bench
import diffusion
import models


def test_dit_benchmarks_tiny():
    args = argparse.Namespace(device="cpu", preset="tiny", official_dit=None)
    train = bench.bench_train_dit(args)
    # counted FLOPs of a DiT-T/2 step: forward + backward is about 3x the forward's 2 FLOPs per
    # weight per token of the attention and MLP linears (batch 8, 16 tokens); a count of the
    # forward alone would be a third of that
    net = models.build_generator("DiT-T/2", input_size=8)
    token_weights = sum(p.numel() for n, p in net.named_parameters() if ".attn." in n or ".mlp." in n)
    estimate = 3 * 2 * token_weights * 16 * 8
    assert 0.9 * estimate < train["train_tflop_per_step"] * 1e12 < 1.3 * estimate
    for key in ("dit_fp32", "dit_bf16", "sit_bf16"):
        assert train[f"{key}_img_s"] > 0 and 0 < train[f"{key}_mfu_vs_measured_peak"] < 1.5
    sample = bench.bench_sample_dit(args)
    assert sample["fp32_img_s"] > 0 and sample["bf16_img_s"] > 0


def test_repa_benchmark_counts_the_encoder_forward():
    """The REPA step's FLOPs exceed the plain SiT step's by the ViT-S/14 forward (2 FLOPs per
    linear weight per token: 16 patches and the class token, batch 8) and the projector's forward
    and backward (2048 wide, on the SiT-T's 16 tokens)."""
    result = bench.bench_train_repa(argparse.Namespace(device="cpu", preset="tiny"))
    encoder = models.DINOv2_models["dinov2_vits14"]()
    linear = sum(p.numel() for n, p in encoder.named_parameters() if n.startswith("blocks.") and n.endswith("weight")
                 and p.ndim == 2)
    projector = sum(p.numel() for p in models.build_projector(128, 2048, 384).parameters() if p.ndim == 2)
    estimate = 2 * linear * 17 * 8 + 3 * 2 * projector * 16 * 8  # the projector runs forward and backward
    extra = (result["repa_tflop_per_step"] - result["sit_tflop_per_step"]) * 1e12
    assert 0.95 * estimate < extra < 1.2 * estimate
    for key in ("sit_fp32", "sit_bf16", "repa_fp32", "repa_bf16"):
        assert result[f"{key}_img_s"] > 0 and 0 < result[f"{key}_mfu_vs_measured_peak"] < 1.5


def test_official_clone_is_imported_under_other_names(tmp_path):
    """A stand-in with the official layout (models.py with DiT_models, a diffusion package with
    create_diffusion and relative imports) loads without replacing our modules."""
    (tmp_path / "diffusion").mkdir()
    (tmp_path / "models.py").write_text("DiT_models = {'DiT-T/2': 'theirs'}\n")
    (tmp_path / "diffusion" / "__init__.py").write_text("from .helper import create_diffusion\n")
    (tmp_path / "diffusion" / "helper.py").write_text(textwrap.dedent("""
        def create_diffusion(timestep_respacing):
            return 'their diffusion'
    """))
    theirs_models, theirs_diffusion = bench._load_official_dit(str(tmp_path))
    assert theirs_models.DiT_models["DiT-T/2"] == "theirs"
    assert theirs_diffusion.create_diffusion("") == "their diffusion"
    assert sys.modules["models"] is models and sys.modules["diffusion"] is diffusion
