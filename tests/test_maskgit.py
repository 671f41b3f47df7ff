"""MaskGIT: the transformer against MaskGIT-pytorch v1.0's layout (names, shapes, counts, a
reference forward), the masking schedules and the loss, the decoding loop's invariants, the token
cache, and train_maskgit.py / sample.py / evaluate.py gen through their real command lines."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models
import train_maskgit
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def run_cli(script, args, nproc=1, timeout=300):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: on a shared 2-core machine thread start-ups cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kwargs):
    torch.manual_seed(0)
    config = dict(input_size=4, codebook_size=32, num_classes=10, hidden_size=64, depth=2, num_heads=4, mlp_dim=128)
    net = models.MaskGIT(**{**config, **kwargs}).eval()
    with torch.no_grad():  # v1.0's N(0, 1) table makes a random network's tied logits nearly one-hot
        net.tok_emb.weight.mul_(0.1)
    return net


# ----------------------------------------------------------------------------- the network


def v1_state_shapes(hidden, depth, mlp, num_tokens, codebook, num_classes):
    """MaskGIT-pytorch v1.0's MaskTransformer parameters: names and shapes, written out from its
    module tree (Sequential indices, PreNorm's `fn`, nn.MultiheadAttention's in_proj)."""
    vocab = codebook + 1 + num_classes + 1
    shapes = {"tok_emb.weight": (vocab, hidden), "pos_emb": (1, num_tokens + 1, hidden), "bias": (num_tokens + 1, vocab)}
    for seq, idx in (("first_layer", (0, 2, 4, 6)), ("last_layer", (0, 2, 4))):
        for i in idx:
            shapes[f"{seq}.{i}.weight"] = (hidden, hidden) if i % 4 == 2 else (hidden,)
            shapes[f"{seq}.{i}.bias"] = (hidden,)
    for b in range(depth):
        p = f"transformer.layers.{b}"
        shapes.update({f"{p}.0.norm.weight": (hidden,), f"{p}.0.norm.bias": (hidden,),
                       f"{p}.0.fn.mha.in_proj_weight": (3 * hidden, hidden), f"{p}.0.fn.mha.in_proj_bias": (3 * hidden,),
                       f"{p}.0.fn.mha.out_proj.weight": (hidden, hidden), f"{p}.0.fn.mha.out_proj.bias": (hidden,),
                       f"{p}.1.norm.weight": (hidden,), f"{p}.1.norm.bias": (hidden,),
                       f"{p}.1.fn.net.0.weight": (mlp, hidden), f"{p}.1.fn.net.0.bias": (mlp,),
                       f"{p}.1.fn.net.3.weight": (hidden, mlp), f"{p}.1.fn.net.3.bias": (hidden,)})
    return shapes


def test_registry_counts_and_the_published_base_model():
    """Every entry builds on the meta device with v1.0's parameter count less the output-bias entries
    that never reach a logit; for MaskGIT-B that is the published 174.161M (its README) less 258,538."""
    for name, (hidden, depth, heads, mlp) in models.MASKGIT_SIZES.items():
        with torch.device("meta"):
            net = models.MaskGIT_models[f"MaskGIT-{name}"](input_size=16, codebook_size=1024, num_classes=1000)
        theirs = sum(math.prod(s) for s in v1_state_shapes(hidden, depth, mlp, 256, 1024, 1000).values())
        unused = 257 * 2026 - 256 * 1024
        assert sum(p.numel() for p in net.parameters()) == theirs - unused
        if name == "B":
            assert theirs == 174_160_874 and round(theirs / 1e6, 3) == 174.161
            assert (net.config["num_heads"], net.config["dropout"]) == (16, 0.1)


def reference_forward(sd, z, y, num_heads, codebook, num_classes):
    """v1.0's forward written from its layers, on a state dict with its names, with PyTorch's own
    nn.MultiheadAttention; eval mode. -> (N, T, codebook) logits."""
    N, T = z.shape[0], z[0].numel()
    hidden = sd["tok_emb.weight"].shape[1]
    x = F.embedding(torch.cat([z.reshape(N, -1), (y + codebook + 1)[:, None]], 1), sd["tok_emb.weight"]) + sd["pos_emb"]

    def ln(x, p, eps):
        return F.layer_norm(x, (hidden,), sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    x = lin(ln(F.gelu(lin(ln(x, "first_layer.0", 1e-12), "first_layer.2")), "first_layer.4", 1e-12), "first_layer.6")
    for b in range(len({k.split(".")[2] for k in sd if k.startswith("transformer.")})):
        p = f"transformer.layers.{b}"
        mha = nn.MultiheadAttention(hidden, num_heads, batch_first=True).eval()
        mha.load_state_dict({k.split("mha.")[1]: v for k, v in sd.items() if k.startswith(f"{p}.0.fn.mha.")})
        h = ln(x, f"{p}.0.norm", 1e-5)
        x = x + mha(h, h, h)[0]
        x = x + lin(F.gelu(lin(ln(x, f"{p}.1.norm", 1e-5), f"{p}.1.fn.net.0")), f"{p}.1.fn.net.3")
    x = ln(F.gelu(lin(ln(x, "last_layer.0", 1e-12), "last_layer.2")), "last_layer.4", 1e-12)
    logits = x @ sd["tok_emb.weight"].t() + sd["bias"]
    return logits[:, :T, :codebook]


def test_maskgit_pytorch_state_dict_converts_and_computes_the_same_logits(tmp_path):
    """A state dict with v1.0's names and MaskGIT-T's shapes (random values; 1000 classes, as the
    released files): converted, loaded strictly, the same logits as v1.0's forward; its released
    file layout loads through the loader sample.py uses, with --model."""
    g = torch.Generator().manual_seed(0)
    hidden, depth, heads, mlp = models.MASKGIT_SIZES["T"]
    sd = {k: torch.randn(s, generator=g) * (0.5 if len(s) > 1 else 0.1) + (1.0 if "norm" in k and k.endswith("weight") else 0)
          for k, s in v1_state_shapes(hidden, depth, mlp, 16, 32, 1000).items()}
    ours, grid = models.maskgit_pytorch_to_ours(sd)
    assert grid == dict(input_size=4, codebook_size=32, num_classes=1000)
    net = models.MaskGIT_models["MaskGIT-T"](**grid).eval()
    net.load_state_dict(ours, strict=True)
    z = torch.randint(0, 33, (3, 4, 4), generator=g)  # 32 is the mask token
    y = torch.tensor([0, 999, 1000])  # 1000 is the null class
    with torch.no_grad():
        torch.testing.assert_close(net(z, y), reference_forward(sd, z, y, heads, 32, 1000), rtol=1e-4, atol=1e-4)
    torch.save({"iter": 1, "global_epoch": 0, "model_state_dict": sd}, tmp_path / "MaskGIT_tiny.pth")
    loaded, recipe = models.load_generator(str(tmp_path / "MaskGIT_tiny.pth"), "MaskGIT-T")
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    assert recipe["tokens"]["vae"] == "vq-f16-1024" and recipe["image_size"] == 64
    with pytest.raises(ValueError, match="--model"):
        models.load_generator(str(tmp_path / "MaskGIT_tiny.pth"))
    with pytest.raises(KeyError, match="strict loading"):
        models.load_generator(str(tmp_path / "MaskGIT_tiny.pth"), "MaskGIT-S")
    with pytest.raises(KeyError, match="not a MaskGIT-pytorch"):
        models.maskgit_pytorch_to_ours({**sd, "transformer.layers.0.extra.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- schedules and the loss


def test_mask_ratio_endpoints_and_monotonicity():
    r = torch.linspace(0, 1, 101, dtype=torch.float64)
    for mode, (at0, at1) in {"arccos": (1, 0), "cosine": (1, 0), "linear": (0, 1), "square": (0, 1)}.items():
        ratio = models.mask_ratio(r, mode)
        assert ratio[0].item() == pytest.approx(at0, abs=1e-12) and ratio[-1].item() == pytest.approx(at1, abs=1e-12)
        steps = ratio.diff()
        assert (steps < 0).all() if at0 > at1 else (steps > 0).all(), mode
    # arccos masks more than half the tokens with probability 1 - cos(pi / 4): 2 arccos(r)/pi > 1/2 iff r < cos(pi/4)
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (models.mask_ratio(u, "arccos") > 0.5).double().mean().item() == pytest.approx(math.cos(math.pi / 4), abs=5e-3)


def test_unmask_schedule_is_v1s_and_covers_every_token():
    # MaskGIT-pytorch v1.0's adap_sche for 16x16 tokens, run side by side on this machine
    assert models.unmask_schedule(256, 8, "arccos") == [1, 18, 26, 32, 38, 43, 48, 50]
    assert models.unmask_schedule(256, 12, "arccos") == [1, 9, 13, 17, 19, 22, 24, 26, 28, 30, 32, 35]
    assert models.unmask_schedule(256, 8, "cosine") == [1, 12, 22, 32, 41, 47, 51, 50]
    assert models.unmask_schedule(256, 8, "linear") == [1, 9, 18, 27, 37, 46, 55, 63]
    assert models.unmask_schedule(256, 8, "square") == [1, 13, 24, 34, 41, 46, 49, 48]
    assert models.unmask_schedule(256, 8, "root") == [1, 7, 14, 22, 30, 41, 55, 86]
    for T in (16, 64, 256):
        for n in range(1, 13):
            for mode in models.DECODE_SCHEDULES:
                try:
                    counts = models.unmask_schedule(T, n, mode)
                except ValueError:
                    assert n > 4  # only long schedules of few tokens run out
                    continue
                assert len(counts) == n and sum(counts) == T and min(counts) >= 1
    with pytest.raises(ValueError, match="fewer steps"):
        models.unmask_schedule(16, 17)


def test_loss_counts_only_masked_tokens_with_the_true_targets():
    K, a, eps = 32, 3.0, 0.1
    z = torch.randint(0, K, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(z, dtype=torch.bool)
    mask[0, 1, 2] = False  # every token but one masked in sample 0
    mask[1] = torch.rand(4, 4, generator=torch.Generator().manual_seed(2)) < 0.5
    seen = []

    def network(x, y):  # confident in the true token everywhere but at the unmasked positions
        seen.append(x.clone())
        logits = a * F.one_hot(z.flatten(1), K).float()
        logits[~mask.flatten(1)] = a * F.one_hot((z.flatten(1)[~mask.flatten(1)] + 1) % K, K).float()
        return logits

    loss, _ = train_maskgit.masked_token_loss(network, z, torch.zeros(2, dtype=torch.long), mask, K, eps)
    x = seen[0]
    assert (x[0][mask[0]] == K).all() and x[0, 1, 2] == z[0, 1, 2]  # the one unmasked token is shown as it is
    assert torch.equal(x[1][~mask[1]], z[1][~mask[1]]) and (x[1][mask[1]] == K).all()
    # closed form of label-smoothed cross-entropy for logits a * onehot(target): the same at every
    # scored token, so any unmasked token counted (its logits point elsewhere) would change the mean
    log_z = math.log(math.exp(a) + K - 1)
    expected = (1 - eps) * (log_z - a) + eps / K * (K * log_z - a)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert train_maskgit.masked_token_loss(network, z, torch.zeros(2, dtype=torch.long), torch.zeros_like(mask), K,
                                           eps)[0].item() == 0.0  # nothing masked: nothing to score


# ----------------------------------------------------------------------------- decoding


def generators(indices, seed=0):
    return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in indices]


def test_decoding_fixes_tokens_for_good_and_unmasks_everything():
    net = tiny()
    inputs = []
    real = net.forward
    net.forward = lambda z, y: (inputs.append(z.clone()), real(z, y))[1]
    y = torch.tensor([1, 5, 9])
    out = models.maskgit_generate(net, y, generators(range(3)), num_steps=6, r_temp=4.5, cfg_scale=1.0)
    counts = models.unmask_schedule(16, 6)
    assert len(inputs) == 6 and out.shape == (3, 4, 4)
    assert out.min() >= 0 and out.max() < 32  # every token unmasked, none is the mask token
    states = [x.view(3, 16) for x in inputs] + [out.view(3, 16)]
    for i, x in enumerate(states):
        assert ((x == 32).sum(1) == 16 - sum(counts[:i])).all()  # the schedule's count per step
        fixed = x != 32
        for later in states[i + 1:]:
            assert torch.equal(later[fixed], x[fixed])  # a fixed token is never masked or changed again


def test_decoding_is_deterministic_per_sample_and_batch_independent():
    net = tiny()
    y = torch.tensor([3, 3, 7])
    a = models.maskgit_generate(net, y, generators(range(3)), num_steps=4)
    b = models.maskgit_generate(net, y, generators(range(3)), num_steps=4)
    assert torch.equal(a, b)
    alone = models.maskgit_generate(net, y[2:], generators([2]), num_steps=4)
    assert torch.equal(alone[0], a[2])
    assert not torch.equal(a[0], a[1])  # same label, other seed: another sample
    assert not torch.equal(a, models.maskgit_generate(net, y, generators(range(3), seed=1), num_steps=4))


def test_cfg_scale_one_is_the_conditional_model_alone():
    """--cfg-scale 1 (MaskGIT-pytorch's w = 0) never uses the null class; 4 (its w = 3) does."""
    net, other = tiny(), tiny()
    with torch.no_grad():
        other.tok_emb.weight[32 + 1 + 10] = torch.randn(64, generator=torch.Generator().manual_seed(3))  # another null class
    y = torch.tensor([0, 4, 8, 2])
    for scale, same in ((1.0, True), (4.0, False)):
        a = models.maskgit_generate(net, y, generators(range(4)), num_steps=6, cfg_scale=scale)
        b = models.maskgit_generate(other, y, generators(range(4)), num_steps=6, cfg_scale=scale)
        assert torch.equal(a, b) == same, scale
