"""MaskGIT: the transformer against MaskGIT-pytorch v1.0's layout (names, shapes, counts, a
reference forward), the masking schedules and the loss, the decoding loop's invariants, the token
cache, and train_maskgit.py / sample.py / evaluate.py gen through their real command lines."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import models
import train_maskgit
import utils
from test_sample import refusal as sample_refusal
from test_train_dit import compiled_and_eager_runs, read_metrics, refusal as train_dit_refusal, run_cli



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
        monotone = ratio.diff() < 0 if at0 > at1 else ratio.diff() > 0
        assert monotone.all(), mode
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

    loss, *_ = train_maskgit.masked_token_loss(network, z, torch.zeros(2, dtype=torch.long), mask, K, eps)
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


def _two_rank_gradient(rank, port, model, z, y, mask, out):
    """One rank of a 2-process gloo group: its half of the batch through DDP, the gradient saved by rank 0."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = slice(rank * len(z) // 2, (rank + 1) * len(z) // 2)
    ddp = DDP(model)  # kept alive through backward: its hooks average the gradients
    loss, logits, token_weight = train_maskgit.masked_token_loss(ddp, z[half], y[half], mask[half], 32, 0.1)
    loss.backward()
    hits = ((logits.argmax(-1).view_as(z[half]) == z[half]) & mask[half]).sum()
    accuracy, _ = utils.global_sum(hits * token_weight)  # train_maskgit's logged accuracy, times the 2 ranks
    if rank == 0:
        torch.save(([p.grad for p in model.parameters()], accuracy / 2), out)
    torch.distributed.destroy_process_group()


def test_the_loss_is_the_global_batch_mean_on_any_number_of_processes(tmp_path):
    """Two ranks that mask very different numbers of tokens give, through DDP, the gradient of the
    masked-token mean over the whole batch in one process: each rank divides by the global count."""
    import socket

    torch.manual_seed(0)
    model = models.MaskGIT_models["MaskGIT-T"](input_size=4, codebook_size=32, num_classes=10, dropout=0.0)
    z, y = torch.randint(0, 32, (4, 4, 4)), torch.tensor([1, 2, 3, 4])
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:2] = True  # rank 0: 32 masked tokens
    mask[2, 0, 0] = mask[3, 1, 1] = True  # rank 1: 2
    # masked tokens are hidden from the network: set some to its predictions, so that rank 0 gets 4 of 32
    # right and rank 1 1 of 2 (the mean of per-rank accuracies, 0.31, is not the batch's 5 / 34)
    with torch.no_grad():
        guess = model(torch.where(mask, 32, z), y).argmax(-1).view_as(z)
    for n, i, j in ((0, 0, 0), (0, 1, 1), (1, 2, 2), (1, 3, 3), (2, 0, 0)):
        z[n, i, j] = guess[n, i, j]
    z[3, 1, 1] = (guess[3, 1, 1] + 1) % 32
    loss, logits, _ = train_maskgit.masked_token_loss(model, z, y, mask, 32, 0.1)
    expected = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    expected_accuracy = ((logits.argmax(-1).view_as(z) == z) & mask).sum() / mask.sum()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # forked ranks inherit the imported torch (spawned ones import it again: 4 to 5 s each on a slow CPU)
    torch.multiprocessing.start_processes(_two_rank_gradient, args=(port, model, z, y, mask, str(tmp_path / "g.pt")),
                                          nprocs=2, start_method="fork")
    got, accuracy = torch.load(tmp_path / "g.pt")
    for e, g in zip(expected, got):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    assert expected_accuracy.item() == pytest.approx(5 / 34)
    torch.testing.assert_close(accuracy, expected_accuracy)  # the masked-token accuracy of the whole batch


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


# ----------------------------------------------------------------------------- the token cache and the CLIs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One process: the token cache (32 shapes at 32 px, a random tiny VQ model, shards of 10) and
    4 training steps of MaskGIT-T with a sample grid at the end."""
    base = tmp_path_factory.mktemp("maskgit")
    out = run_cli(["--preset", "tiny", "--tokens", str(base / "tokens"), "--cache-shard-size", "10",
                   "--run-dir", str(base / "run")], script="train_maskgit.py")
    assert out.returncode == 0, out.stderr[-3000:]
    return base


def test_token_cache_round_trip(tiny_run):
    """Decoding the cached indices gives what the VQ model decodes from its own quantisation of the
    image (and of its mirror image)."""
    cache = tiny_run / "tokens"
    meta = data.read_cache_meta(str(cache), data.TOKEN_CACHE_FORMAT)
    assert meta["count"] == 32 and meta["token_grid"] == 8 and meta["codebook_size"] == 64 and meta["crop"] == "adm"
    assert [len(np.load(cache / f"tokens-{k:05d}.npy")) for k in range(4)] == [10, 10, 10, 2]
    ae = models.load_autoencoder(meta["vae"]).eval()
    assert data.weights_hash(ae) == meta["vae_hash"]
    ds = data.TokenDataset(str(cache), flip=False)
    x = torch.stack([data.ShapesDataset(32, 32)[i][0] for i in (0, 31)])
    with torch.no_grad():
        for flipped, images in ((0, x), (1, torch.flip(x, dims=[3]))):
            zq, _, indices = ae.quantize_features(ae.encode_features(images))
            cached = torch.from_numpy(np.stack([np.load(cache / "tokens-00000.npy")[0, flipped],
                                                np.load(cache / "tokens-00003.npy")[1, flipped]]).astype(np.int64))
            assert torch.equal(cached, indices)
            torch.testing.assert_close(ae.decode_indices(cached), ae.decode(zq), rtol=1e-5, atol=1e-5)
    # the dataset serves image 31's own tokens (flip=False) as int64 with its label
    assert torch.equal(ds[31][0], torch.from_numpy(np.load(cache / "tokens-00003.npy")[1, 0]).long())
    assert ds[31][1] == 1 and ds[0][0].dtype == torch.int64


def test_tiny_smoke_single_process_outputs(tiny_run):
    run = tiny_run / "run"
    for name in ("log.txt", "metrics.jsonl", "args.json", "checkpoints/0000002.pt", "checkpoints/0000004.pt",
                 "checkpoints/latest.pt", "samples-0000004.png"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["train/loss"]) and 0 <= r["train/acc"] <= 1 and r["train/images_per_sec"] > 0 for r in records)
    assert [r["train/lr"] for r in records] == [5e-5, 1e-4]  # linear warm-up over 2 steps, then --lr
    ckpt = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert ckpt["ema"] is None and ckpt["maskgit"]["tokens"]["vae"].endswith("autoencoder.pt")
    net, recipe = models.load_generator(str(run / "checkpoints" / "latest.pt"))
    assert isinstance(net, models.MaskGIT) and recipe == ckpt["maskgit"] and net.num_tokens == 64
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in net.state_dict().items())


def test_compile_trains_as_eager(tiny_run, tmp_path, monkeypatch):
    """--compile trains the same transformer: the compiled first step's loss, accuracy and gradient
    norm equal the eager step's (on aot_eager, as test_train_dit.py's), and the checkpoint keeps the
    plain parameter names."""
    common = ["--preset", "tiny", "--tokens", str(tiny_run / "tokens"), "--max-steps", "2", "--log-every", "1",
              "--sample-every", "0"]
    network, (reference, ckpt) = compiled_and_eager_runs("train_maskgit.py", common, tmp_path, monkeypatch,
                                                         ("train/loss", "train/acc", "train/grad_norm"))
    assert network == "MaskGIT" and list(ckpt["model"]) == list(reference["model"])


def test_two_process_resume_equals_uninterrupted_run(tiny_run, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--preset", "tiny", "--tokens", str(tiny_run / "tokens"), "--max-steps", "6", "--ckpt-every", "3",
              "--sample-every", "0", "--global-batch-size", "8", "--ema-decay", "0.9"]  # 4 steps per epoch: crosses one
    out = run_cli([*common, "--run-dir", str(full)], nproc=2, script="train_maskgit.py")
    assert out.returncode == 0, out.stderr[-3000:]
    (resumed / "checkpoints").mkdir(parents=True)
    os.link(full / "checkpoints" / "0000003.pt", resumed / "checkpoints" / "0000003.pt")
    out = run_cli([*common, "--resume", str(resumed / "checkpoints" / "0000003.pt")], nproc=2, script="train_maskgit.py")
    assert out.returncode == 0, out.stderr[-3000:]
    a = utils.load_checkpoint(str(full / "checkpoints" / "0000006.pt"))
    b = utils.load_checkpoint(str(resumed / "checkpoints" / "0000006.pt"))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert b["step"] == 6 and len(b["rng"]) == 2 and "world size 2" in (full / "log.txt").read_text()
    assert read_metrics(full)[-1]["train/loss"] == read_metrics(resumed)[-1]["train/loss"]


def test_sample_npz_on_two_processes_and_evaluate_gen(tiny_run, tmp_path):
    ckpt = str(tiny_run / "run" / "checkpoints" / "latest.pt")
    out = run_cli(["--preset", "tiny", "--ckpt", ckpt, "--vae", "scratch:tiny", "--sample-dir", str(tmp_path / "kl")],
                  script="sample.py")  # a KL autoencoder cannot decode tokens: refused before anything is written
    assert out.returncode == 2 and "tokens of a 64-code VQ model" in out.stderr and not (tmp_path / "kl").exists()
    out = run_cli(["--preset", "tiny", "--ckpt", ckpt, "--num-samples", "6", "--per-proc-batch-size", "2",
                   "--sample-dir", str(tmp_path / "s")], nproc=2, script="sample.py")
    assert out.returncode == 0, out.stderr[-3000:]
    samples = np.load(tmp_path / "s" / "samples.npz")
    assert samples["arr_0"].shape == (6, 32, 32, 3) and samples["arr_0"].dtype == np.uint8 and samples["arr_1"].max() < 10
    settings = json.loads((tmp_path / "s" / "settings.json").read_text())
    assert (settings["num_steps"], settings["cfg_scale"], settings["r_temp"], settings["sched_mode"]) == (4, 4.0, 4.5, "arccos")
    # sample i depends on the seed and i alone: samples 4 and 5, recomputed here in a batch of their own
    import diffusion

    net, recipe = models.load_generator(ckpt)
    ae = models.load_autoencoder(recipe["tokens"]["vae"]).eval()
    noise = diffusion.SampleNoise(0, [4, 5], "cpu")
    y = noise.labels(net.num_classes)
    z = models.maskgit_generate(net.eval(), y, noise.generators, num_steps=4)
    assert np.array_equal(samples["arr_1"][4:], y.numpy())
    assert np.abs(models.to_uint8(ae.decode_indices(z)).permute(0, 2, 3, 1).numpy().astype(int)
                  - samples["arr_0"][4:]).max() <= 1
    ref = tmp_path / "ref.npz"
    res = run_cli(["ref", "--data-path", "builtin:shapes:8", "--image-size", "32", "--out", str(ref),
                   "--inception-weights", "random", "--preset", "tiny"], script="evaluate.py")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli(["gen", "--ref", str(ref), "--sample", str(tmp_path / "s" / "samples.npz"),
                   "--inception-weights", "random", "--preset", "tiny", "--sqrtm", "eigh",
                   "--out", str(tmp_path / "gen.json")], script="evaluate.py")
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.isfinite(json.loads((tmp_path / "gen.json").read_text())["fid"])


def refusal(argv, capsys):
    return train_dit_refusal(argv, capsys, module=train_maskgit)


def test_bad_input_fails_before_anything_is_written(tiny_run, tmp_path, capsys):
    code, err = refusal(["--preset", "tiny", "--tokens", str(tmp_path / "t"), "--vae", "scratch:tiny",
                         "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "continuous (KL)" in err and "--vae scratch:tiny" in err
    code, err = refusal(["--preset", "tiny", "--tokens", str(tiny_run / "tokens"), "--num-steps", "65",
                         "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--num-steps 65" in err
    code, err = sample_refusal(["--preset", "tiny", "--ckpt", str(tiny_run / "run" / "checkpoints" / "latest.pt"),
                                "--sampler", "ddim", "--sample-dir", str(tmp_path / "s")], capsys)
    assert code == 2 and "--sampler is for DiT/SiT models" in err
    code, err = sample_refusal(["--preset", "tiny", "--recipe", "repa", "--ckpt", str(tiny_run / "run" / "checkpoints" / "latest.pt"),
                                "--sample-dir", str(tmp_path / "s")], capsys)
    assert code == 2 and "--recipe repa is a DiT/SiT sampler setting" in err
    # without label dropout the null class is never trained: guidance is refused, in training grids and in sample.py
    code, err = refusal(["--preset", "tiny", "--tokens", str(tiny_run / "tokens"), "--class-dropout-prob", "0",
                         "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "--class-dropout-prob 0 leaves it untrained" in err
    state = utils.load_checkpoint(str(tiny_run / "run" / "checkpoints" / "latest.pt"))
    state["maskgit"]["class_dropout_prob"] = 0.0
    torch.save(state, tmp_path / "no-dropout.pt")
    code, err = sample_refusal(["--preset", "tiny", "--ckpt", str(tmp_path / "no-dropout.pt"), "--sample-dir", str(tmp_path / "s")], capsys)
    assert code == 2 and "no null class to guide with" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "t" / "meta.json").exists() and not (tmp_path / "s").exists()


def test_a_moved_cache_keeps_its_scratch_model_and_any_seed_reuses_it(tiny_run, tmp_path):
    """A cache built with a scratch: VQ model keeps its weights inside; moved elsewhere it still
    decodes (sample grids), and --preset tiny with another --global-seed reuses it, not new weights."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(tiny_run / "tokens", moved)
    meta = json.loads((moved / "meta.json").read_text())  # as if built in a folder since moved away
    meta["vae"] = str(tmp_path / "gone" / "autoencoder.pt")
    (moved / "meta.json").write_text(json.dumps(meta))
    out = run_cli(["--preset", "tiny", "--tokens", str(moved), "--global-seed", "1", "--max-steps", "1", "--sample-every", "1",
                   "--run-dir", str(tmp_path / "run")], script="train_maskgit.py")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "samples-0000001.png").is_file()


def test_benchmarks_tiny():
    """bench.py's MaskGIT entries: the counted FLOPs of a training step are about 3x the forward's
    2 FLOPs per weight per token (the transformer's linears over T + 1 tokens, the tied output
    projection over T), and the rates are positive."""
    import argparse

    import bench

    args = argparse.Namespace(device="cpu", preset="tiny", official_dit=None)
    train = bench.bench_train_maskgit(args)
    hidden, depth, _, mlp = models.MASKGIT_SIZES["T"]
    weights = depth * (4 * hidden * hidden + 2 * hidden * mlp) + 3 * hidden * hidden
    estimate = 3 * 2 * (weights * 65 + 1024 * hidden * 64) * 8
    assert 0.95 * estimate < train["train_tflop_per_step"] * 1e12 < 1.2 * estimate
    from test_bench import check_rates

    check_rates(train, ("fp32", "bf16"))
    assert bench.bench_sample_maskgit(args)["bf16_img_s"] > 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path, monkeypatch):
    real = train_maskgit.masked_token_loss
    calls = {"n": 0}

    def planted(*a, **k):
        loss, *rest = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), *rest

    monkeypatch.setattr(train_maskgit, "masked_token_loss", planted)
    run = tmp_path / "run"
    args = train_maskgit.parse_args(["--preset", "tiny", "--tokens", str(tiny_run / "tokens"), "--max-steps", "6",
                                     "--ckpt-every", "2", "--log-every", "1", "--sample-every", "0", "--run-dir", str(run)])
    with pytest.raises(SystemExit) as e:
        train_maskgit.main(args)
    assert e.value.code == 3 and "non-finite loss or gradient at step 3" in (run / "log.txt").read_text()
    assert utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == 2


def test_released_names_resolve_offline_to_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(RuntimeError) as e:
        models.load_generator("MaskGIT-B-256")
    assert models.PRETRAINED_MASKGIT["MaskGIT-B-256"]["url"] in str(e.value)
    assert os.path.join(str(tmp_path / "cache"), "generators", "MaskGIT_ImageNet_256.pth") in str(e.value)
