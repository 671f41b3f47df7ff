"""bench.py's benchmarks run and report sane numbers, attention included in the FLOP count; the
command line refuses bad input up front and survives a failing benchmark; the official-code hook
imports a clone without shadowing our models.py and diffusion.py."""
import argparse
import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import bench
import diffusion
import models


def test_attention_flops_are_counted_on_cpu():
    """Forward QK^T and AV (2 FLOPs per multiply-add each: 4 B H T^2 d), backward twice that: 12 B H T^2 d.
    PyTorch's counter has no formula for CPU's fused attention kernel and would count 0."""
    B, H, T, d = 2, 3, 16, 8
    q, k, v = (torch.randn(B, H, T, d, requires_grad=True) for _ in range(3))
    assert bench._count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 12 * B * H * T**2 * d


def check_rates(result, keys):
    """images/s for every contender; MFU in (0, 1.5) where its precision has a measured peak: on a CPU
    without hardware bf16 the bf16 contenders have none, and the result says why."""
    native_bf16 = bench._native_bf16(torch.device("cpu"))
    for key in keys:
        assert result[f"{key}_img_s"] > 0
        if "bf16" in key and not native_bf16:
            assert f"{key}_mfu_vs_measured_peak" not in result and "no hardware bf16" in result["bf16_note"]
        else:
            assert 0 < result[f"{key}_mfu_vs_measured_peak"] < 1.5


def test_emulated_bf16_gets_no_peak_and_no_mfu(monkeypatch):
    """An AVX2-only CPU emulates bf16 (a 2048^3 matmul takes about a minute): its peak is not
    measured, and a bf16 contender's MFU is left out rather than quoted against it."""
    monkeypatch.setattr(bench, "_native_bf16", lambda device: False)
    cpu, result = torch.device("cpu"), {}
    peaks = bench._measured_peaks(cpu, result)
    assert list(peaks) == ["fp32"] and peaks["fp32"] > 0 and "measured_peak_tflops_bf16" not in result
    bench._add_mfu(result, "dit_bf16", 1e9, 1.0, peaks, cpu)
    bench._add_mfu(result, "dit_fp32", 1e9, 1.0, peaks, cpu)
    assert "dit_bf16_mfu_vs_measured_peak" not in result and "no hardware bf16" in result["bf16_note"]
    assert result["dit_fp32_mfu_vs_measured_peak"] == pytest.approx(1e9 / peaks["fp32"])


def test_dit_benchmarks_tiny():
    args = argparse.Namespace(device="cpu", preset="tiny", official_dit=None, compile=False)
    train = bench.bench_train_dit(args)
    # counted FLOPs of a DiT-T/2 step: forward + backward is about 3x the forward's 2 FLOPs per
    # weight per token of the attention and MLP linears (batch 8, 16 tokens) plus the attention
    # itself (4 T^2 x hidden per layer and image); a count of the forward alone would be a third
    net = models.build_generator("DiT-T/2", input_size=8)
    token_weights = sum(p.numel() for n, p in net.named_parameters() if ".attn." in n or ".mlp." in n)
    attention = 4 * 16**2 * net.x_embedder.proj.out_channels * len(net.blocks)
    estimate = 3 * (2 * token_weights * 16 + attention) * 8
    assert 0.9 * estimate < train["train_tflop_per_step"] * 1e12 < 1.3 * estimate
    check_rates(train, ("dit_fp32", "dit_bf16", "sit_bf16"))
    sample = bench.bench_sample_dit(args)
    assert sample["fp32_img_s"] > 0 and sample["bf16_img_s"] > 0


def test_compiled_dit_contender_is_wired_like_train_dit(monkeypatch):
    """--compile adds the torch.compile'd bf16 DiT step: the trainer's network compiled once, its
    first call (the compilation) timed apart, FLOPs as the eager step's. torch.compile is replaced by
    a recorder here; that the compiled step trains as the eager one is tested in test_train_dit.py."""
    compiled = []

    def record(model, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", record)
    result = bench.bench_train_dit(argparse.Namespace(device="cpu", preset="tiny", official_dit=None, compile=True))
    assert len(compiled) == 1 and compiled[0].family == "dit" and compiled[0].training
    assert result["dit_bf16_compiled_first_call_s"] > 0
    check_rates(result, ("dit_fp32", "dit_bf16", "sit_bf16", "dit_bf16_compiled"))
    # without --compile (the CPU default) there is no such contender
    assert not bench.parse_args(["--device", "cpu"]).compile and bench.parse_args(["--device", "cpu", "--compile"]).compile


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
    check_rates(result, ("sit_fp32", "sit_bf16", "repa_fp32", "repa_bf16"))


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


def test_command_line_writes_json_and_survives_a_failing_benchmark(tmp_path, monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(bench.BENCHMARKS, "broken", broken)
    out = tmp_path / "bench.json"
    args = bench.parse_args(["--only", "sample_maskgit", "--preset", "tiny", "--device", "cpu", "--out", str(out)])
    args.only.insert(0, "broken")  # first, so the one after it must still run
    with pytest.raises(SystemExit, match="failed: broken"):
        bench.main(args)
    saved = json.loads(out.read_text())
    assert saved["failed"] == ["broken"] and list(saved["results"]) == ["sample_maskgit"]
    assert saved["results"]["sample_maskgit"]["fp32_img_s"] > 0 and saved["torch"] == torch.__version__
    # CPU numbers name the machine: bf16 rates mean little without hardware bf16
    assert saved["cpu"] and saved["threads"] == torch.get_num_threads()
    assert saved["hardware_bf16"] == bench._native_bf16(torch.device("cpu"))
    assert "RuntimeError: out of memory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}"], "give a JSON file name"),
    (["--out", "{tmp}/missing/bench.json"], "give a JSON file name"),
    (["--only", "train_dit", "--official-dit", "{tmp}"], "not a clone of facebookresearch/DiT"),
    (["--only", "sample_dit", "--official-dit", "{tmp}"], "add train_dit to --only"),
    (["--preset", "tiny", "--official-dit", "{tmp}"], "no DiT-T/2"),
])
def test_bad_flags_fail_before_any_benchmark(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--device", "cpu"] + [a.format(tmp=tmp_path) for a in argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_datasheet_peak_prefers_the_specific_part(monkeypatch):
    """An H100 PCIe is not quoted against the SXM part's 989 TFLOP/s; unknown GPUs get no datasheet MFU."""
    cuda = torch.device("cuda")
    for name, tflops in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200 NVL", 835),
                         ("NVIDIA H200", 989), ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench._datasheet_bf16_tflops(cuda) == tflops
    assert bench._datasheet_bf16_tflops(torch.device("cpu")) is None
