"""The latent cache and train_dit.py through its real command line: cache building (once, refused
for another autoencoder, resumed after an interruption, flips, statistics), 1 and 2 processes,
exact resume, SIGTERM, NaN stop, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import models
import train_dit
import utils
from cli import ENV, ROOT
import cli


def run_cli(args, nproc=1, timeout=300, script="train_dit.py"):
    return cli.run(script, args, nproc=nproc, timeout=timeout)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def refusal(argv, capsys, module=train_dit):
    """(exit code, stderr) of a command line of `module` that must stop before any work, run in this
    process: a refusal needs no interpreter of its own (one takes 4 to 5 s to import torch on a slow
    CPU). sample.py's main() turns gradients off for the process: here only inside."""
    with torch.enable_grad(), pytest.raises(SystemExit) as stop:
        module.main(module.parse_args(argv))
    return stop.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tiny cache (32 shapes at 32 px, scratch:tiny autoencoder) shared by the CLI tests."""
    folder = tmp_path_factory.mktemp("cache") / "latents"
    out = run_cli(["--preset", "tiny", "--latents", str(folder), "--max-steps", "1", "--sample-every", "0",
                   "--cache-shard-size", "10", "--run-dir", str(folder.parent / "first")])
    assert out.returncode == 0, out.stderr[-3000:]
    return folder


# ----------------------------------------------------------------------------- the cache


def test_cache_holds_every_image_and_its_flip_with_exact_statistics(cache):
    meta = data.read_cache_meta(str(cache))
    assert meta["count"] == 32 and meta["latent_shape"] == [4, 8, 8] and meta["shard_images"] == 10
    assert meta["class_names"][:3] == ["circle", "square", "triangle"]
    shards = [np.load(cache / f"moments-{k:05d}.npy") for k in range(4)]
    assert [len(s) for s in shards] == [10, 10, 10, 2]
    moments = np.concatenate(shards).astype(np.float64)  # (32, 2, 2, 4, 8, 8)
    # the stored moments are the autoencoder's posterior of the ADM crop and of its mirror image
    ae = models.load_autoencoder(meta["vae"]).eval()
    assert data.weights_hash(ae) == meta["vae_hash"]
    x = torch.stack([data.ShapesDataset(32, 32)[i][0] for i in (0, 31)])
    with torch.no_grad():
        for flip in (0, 1):
            posterior = ae.encode(torch.flip(x, dims=[3]) if flip else x)
            np.testing.assert_allclose(moments[[0, 31], flip, 0], posterior.mean.numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(moments[[0, 31], flip, 1], posterior.std.numpy(), atol=2e-3, rtol=2e-3)
    # channel statistics of z = mean + std * noise, directly: E[z] and Var[z] over all entries
    mean, std = moments[:, :, 0], moments[:, :, 1]
    mu = mean.mean(axis=(0, 1, 3, 4))
    var = (mean ** 2 + std ** 2).mean(axis=(0, 1, 3, 4)) - mu ** 2
    np.testing.assert_allclose(meta["channel_mean"], mu, rtol=1e-9)
    np.testing.assert_allclose(meta["channel_std"], np.sqrt(var), rtol=1e-9)
    # --no-latent-sample trains on the means alone: their own, narrower std
    np.testing.assert_allclose(meta["channel_std_of_mean"], mean.std(axis=(0, 1, 3, 4)), rtol=1e-9)
    assert all(a < b for a, b in zip(meta["channel_std_of_mean"], meta["channel_std"]))
    assert np.array_equal(np.load(cache / "labels.npy"), np.arange(32) % 10)
    # and a Monte-Carlo check that those are the statistics of sampled latents
    z = mean + std * np.random.default_rng(0).standard_normal(mean.shape)
    np.testing.assert_allclose(z.std(axis=(0, 1, 3, 4)), np.sqrt(var), rtol=0.05)


def test_coder_of_loads_the_recorded_autoencoder_and_refuses_other_weights(cache, tmp_path):
    meta = data.read_cache_meta(str(cache))
    ae = data.coder_of(meta)
    assert not ae.training and data.weights_hash(ae) == meta["vae_hash"]
    other = tmp_path / "other.pt"
    torch.manual_seed(1)  # the cache's were drawn after seed 0
    models.save_autoencoder(models.load_autoencoder("scratch:tiny"), str(other))  # the same design, other weights
    with pytest.raises(ValueError, match="weights hash differs"):
        data.coder_of(meta, str(other))
    assert data.weights_hash(data.coder_of(meta, str(other), check_hash=False)) != meta["vae_hash"]
    with pytest.raises(ValueError, match="missing.pt failed to load"):
        data.coder_of(meta, str(tmp_path / "missing.pt"))


def test_cache_is_reused_and_refused_for_another_autoencoder_or_size(cache, tmp_path, capsys):
    before = {p: os.path.getmtime(cache / p) for p in os.listdir(cache)}
    out = run_cli(["--preset", "tiny", "--latents", str(cache), "--max-steps", "1", "--sample-every", "0",
                   "--run-dir", str(tmp_path / "again")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "caching latents" not in out.stderr  # the same autoencoder and size: reused, not rebuilt
    assert {p: os.path.getmtime(cache / p) for p in os.listdir(cache)} == before
    code, err = refusal(["--preset", "tiny", "--latents", str(cache), "--vae", "scratch:small", "--run-dir", str(tmp_path / "r1")], capsys)
    assert code == 2 and "vae_hash" in err and "another cache folder" in err
    # the same scratch architecture under another seed: the weights the cache drew, not new ones
    out = run_cli(["--preset", "tiny", "--latents", str(cache), "--global-seed", "1", "--max-steps", "1", "--sample-every", "0",
                   "--run-dir", str(tmp_path / "seed1")])
    assert out.returncode == 0, out.stderr[-3000:]
    code, err = refusal(["--preset", "tiny", "--latents", str(cache), "--image-size", "64", "--run-dir", str(tmp_path / "r2")], capsys)
    assert code == 2 and "image_size" in err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_interrupted_cache_build_resumes_and_matches_a_full_build(cache, tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    # what an interruption leaves: the plan, two finished shards, one half-written temp file
    for name in ("labels.npy", "moments-00000.npy", "moments-00002.npy"):
        shutil.copyfile(cache / name, folder / name)
    plan = {k: v for k, v in data.read_cache_meta(str(cache)).items() if k not in ("channel_mean", "channel_std")}
    utils.write_json(str(folder / "build.json"), plan)
    (folder / "moments-00001.npy.tmp.npy").write_bytes(b"\x93NUMPY partial")
    with pytest.raises(FileNotFoundError, match="interrupted build"):
        data.LatentDataset(str(folder))
    os.utime(folder / "moments-00000.npy", (1, 1))  # a finished shard is never rewritten
    # finished on 2 processes: each encodes, then reads for the statistics, its own shards
    out = run_cli(["--preset", "tiny", "--latents", str(folder), "--cache-shard-size", "10", "--max-steps", "1",
                   "--sample-every", "0", "--global-batch-size", "8", "--run-dir", str(tmp_path / "run")], nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.getmtime(folder / "moments-00000.npy") == 1
    assert (folder / "build.json").exists()  # kept: a later repair must be the same build
    for k in range(4):
        assert np.array_equal(np.load(folder / f"moments-{k:05d}.npy"), np.load(cache / f"moments-{k:05d}.npy"))
    resumed, built_in_one = data.read_cache_meta(str(folder)), data.read_cache_meta(str(cache))
    for key in ("channel_mean", "channel_std", "channel_std_of_mean"):  # to the last bit, as in one process
        assert resumed[key] == built_in_one[key]


def test_truncated_or_foreign_shard_is_named(cache, tmp_path):
    folder = tmp_path / "latents"
    folder.mkdir()
    for name in os.listdir(cache):
        os.link(cache / name, folder / name)
    os.remove(folder / "moments-00002.npy")
    (folder / "moments-00002.npy").write_bytes((cache / "moments-00002.npy").read_bytes()[:300])
    with pytest.raises(RuntimeError, match="moments-00002.npy"):
        data.LatentDataset(str(folder))
    os.remove(folder / "moments-00002.npy")
    np.save(folder / "moments-00002.npy", np.zeros((10, 2, 2, 4, 4, 4), np.float16))
    with pytest.raises(RuntimeError, match="moments-00002.npy holds"):
        data.LatentDataset(str(folder))


def test_a_damaged_cache_is_repaired_by_rebuilding_only_its_missing_shard(cache, tmp_path):
    """The fix the shard error prints works: delete the shard and meta.json, run again with the
    cache's --data-path and --vae (the tiny preset's), and only that shard is encoded again."""
    folder = tmp_path / "latents"
    shutil.copytree(cache, folder)
    os.remove(folder / "moments-00001.npy")
    with pytest.raises(RuntimeError, match="delete it and .*meta.json, then run again"):
        data.LatentDataset(str(folder))
    os.remove(folder / "meta.json")
    os.utime(folder / "moments-00000.npy", (1, 1))
    out = run_cli(["--preset", "tiny", "--latents", str(folder), "--cache-shard-size", "10", "--max-steps", "1",
                   "--sample-every", "0", "--run-dir", str(tmp_path / "run")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.getmtime(folder / "moments-00000.npy") == 1
    assert np.array_equal(np.load(folder / "moments-00001.npy"), np.load(cache / "moments-00001.npy"))
    repaired, original = data.read_cache_meta(str(folder)), data.read_cache_meta(str(cache))
    assert repaired.pop("vae") == str(folder / "autoencoder.pt") and original.pop("vae") == str(cache / "autoencoder.pt")
    assert repaired == original  # the channel statistics included


def test_cache_refusals_write_nothing_and_name_the_folder(cache, tmp_path, capsys):
    """Another --data-path for a complete cache; shards that no build.json explains; a build for
    another autoencoder (its autoencoder.pt stays); a file, a corrupt meta.json or a token cache
    as --latents: one error line each, nothing written."""
    code, err = refusal(["--preset", "tiny", "--latents", str(cache), "--data-path", "builtin:shapes-plain:32",
                        "--run-dir", str(tmp_path / "r0")], capsys)
    assert code == 2 and "data: cache has 'builtin:shapes:32:0'" in err
    folder = tmp_path / "latents"
    shutil.copytree(cache, folder)
    ae_bytes = (folder / "autoencoder.pt").read_bytes()
    os.remove(folder / "meta.json")
    code, err = refusal(["--preset", "tiny", "--latents", str(folder), "--global-seed", "1", "--run-dir", str(tmp_path / "r1")], capsys)
    assert code == 2 and "vae_hash" in err  # build.json: another autoencoder's build
    assert (folder / "autoencoder.pt").read_bytes() == ae_bytes
    os.remove(folder / "build.json")
    code, err = refusal(["--preset", "tiny", "--latents", str(folder), "--run-dir", str(tmp_path / "r2")], capsys)
    assert code == 2 and "holds cache shards but no build.json" in err
    assert (folder / "autoencoder.pt").read_bytes() == ae_bytes
    (tmp_path / "file").write_text("x")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "meta.json").write_text("{not json")
    (tmp_path / "tokens").mkdir()
    utils.write_json(str(tmp_path / "tokens" / "meta.json"), {"format": data.TOKEN_CACHE_FORMAT})
    for latents, message in (("file", "is a file"), ("corrupt", "meta.json is unreadable"), ("tokens", "not a latent cache")):
        code, err = refusal(["--latents", str(tmp_path / latents), "--model", "DiT-T/2", "--run-dir", str(tmp_path / "r3")], capsys)
        assert code == 2 and message in err, err
    assert not any((tmp_path / r).exists() for r in ("r0", "r1", "r2", "r3"))


def test_float16_overflow_is_refused_with_the_fix(tmp_path):
    """Posterior means beyond float16's 65504 would be stored as inf (and the channel statistics as
    NaN): the build stops and names --cache-dtype float32."""
    dataset = data.ShapesDataset(4, 16)
    encode = lambda x: (torch.full((len(x), 4, 2, 2), 1e6), torch.ones(len(x), 4, 2, 2))  # noqa: E731
    with pytest.raises(RuntimeError, match="--cache-dtype float32"):
        data.build_latent_cache(str(tmp_path / "c"), dataset, encode, {"vae_hash": "x"}, (4, 2, 2), num_workers=0)
    meta = data.build_latent_cache(str(tmp_path / "c32"), dataset, encode, {"vae_hash": "x"}, (4, 2, 2), num_workers=0,
                                   dtype="float32")
    assert meta["channel_mean"] == [1e6] * 4


def test_latent_dataset_flips_per_epoch_and_normalisation_round_trip(cache):
    ds = data.LatentDataset(str(cache), flip=True, seed=0)
    raw = np.load(cache / "moments-00000.npy")
    picks = []
    for epoch in range(4):
        ds.epoch = epoch
        moments, label = ds[3]
        assert label == 3
        picks.append(next(f for f in (0, 1) if np.array_equal(moments.numpy(), raw[3, f].astype(np.float32))))
    assert set(picks) == {0, 1}  # both the image and its flip are seen over epochs
    assert all(torch.equal(data.LatentDataset(str(cache), flip=False)[5][0], torch.from_numpy(raw[5, 0].astype(np.float32)))
               for _ in range(2))
    z = torch.randn(2, 4, 8, 8)
    meta = data.read_cache_meta(str(cache))
    for latent in (dict(norm="scale", scale=0.18215, shift=0.1),
                   dict(norm="channel", mean=meta["channel_mean"], std=meta["channel_std"])):
        torch.testing.assert_close(data.denormalize_latents(data.normalize_latents(z, latent), latent), z)
    x = data.normalize_latents(z, dict(norm="channel", mean=meta["channel_mean"], std=meta["channel_std"]))
    torch.testing.assert_close(x[:, 1], (z[:, 1] - meta["channel_mean"][1]) / meta["channel_std"][1])


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("model", ["DiT-T/2", "SiT-T/2"])
def test_tiny_smoke_single_process(cache, tmp_path, model):
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--latents", str(cache), "--model", model, "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("log.txt", "metrics.jsonl", "args.json", "checkpoints/0000002.pt", "checkpoints/0000004.pt",
                 "checkpoints/latest.pt", "samples-0000004.png"):
        assert (run / name).is_file(), name
    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["train/loss"]) and r["train/images_per_sec"] > 0 for r in records)
    ckpt = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    recipe = ckpt["generator"]
    assert recipe["objective"]["kind"] == ("diffusion" if model.startswith("DiT") else "transport")
    assert recipe["latent"]["norm"] == "scale" and recipe["latent"]["vae"].endswith("autoencoder.pt")
    assert "module." not in "".join(ckpt["model"]) and set(ckpt["ema"]) == set(ckpt["model"])
    net, loaded = models.load_generator(str(run / "checkpoints" / "latest.pt"))
    assert loaded == recipe and net.family == ("dit" if model.startswith("DiT") else "sit")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in net.state_dict().items())


def compiled_and_eager_runs(script, common, tmp_path, monkeypatch, keys):
    """Runs `script` with `common` flags once eagerly and once with --compile, and checks that the
    compiled first step's logged `keys` equal the eager step's (the second step's within float noise
    that Adam amplifies) and that the compiled network was the only one compiled. Returns the two
    final checkpoints (eager, compiled). The graph goes through Dynamo and AOT autograd as with
    inductor, but runs on aot_eager: inductor's C++ code generation costs a minute a test on a
    2-core CPU (run by hand on the DiT, with inductor's random ops on eager's RNG, it passed too)."""
    real_compile, compiled_types = torch.compile, []

    def aot_eager(model, **kwargs):
        compiled_types.append(type(model).__name__)
        return real_compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)
    for name, flags in (("eager", []), ("compiled", ["--compile"])):
        out = run_cli([*common, *flags, "--run-dir", str(tmp_path / name)], script=script)
        assert out.returncode == 0, out.stderr[-3000:]
    assert len(compiled_types) == 1  # the --compile run only
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["step"] for r in eager] == [r["step"] for r in compiled] == [1, 2]
    for a, b in zip(eager, compiled):
        tolerance = 1e-5 if a["step"] == 1 else 1e-3
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=tolerance), (a["step"], key)
    return compiled_types[0], [utils.load_checkpoint(str(tmp_path / name / "checkpoints" / "latest.pt"))
                               for name in ("eager", "compiled")]


def test_compile_trains_as_eager(cache, tmp_path, monkeypatch):
    """--compile trains the same network: the compiled step's loss and gradient norm equal the eager
    step's, and the checkpoint keeps the plain parameter names (no torch.compile prefix)."""
    common = ["--preset", "tiny", "--latents", str(cache), "--max-steps", "2", "--log-every", "1", "--sample-every", "0"]
    network, (reference, ckpt) = compiled_and_eager_runs("train_dit.py", common, tmp_path, monkeypatch,
                                                         ("train/loss", "train/grad_norm"))
    assert network == "DiT"
    assert list(ckpt["model"]) == list(reference["model"]) and list(ckpt["ema"]) == list(reference["ema"])


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_reproduces_uninterrupted_run(cache, tmp_path, nproc):
    """On 2 processes with a SiT, the gvp path and per-channel normalisation; on 1 with a DiT."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--preset", "tiny", "--latents", str(cache), "--max-steps", "6", "--ckpt-every", "3", "--sample-every", "0",
              "--global-batch-size", "8"]  # 32 images / 8 = 4 steps per epoch: the resumed run crosses an epoch
    if nproc == 2:
        common += ["--model", "SiT-T/2", "--path-type", "gvp", "--latent-norm", "channel"]
    out = run_cli([*common, "--run-dir", str(full)], nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    (resumed / "checkpoints").mkdir(parents=True)
    os.link(full / "checkpoints" / "0000003.pt", resumed / "checkpoints" / "0000003.pt")
    out = run_cli([*common, "--resume", str(resumed / "checkpoints" / "0000003.pt")], nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    a = utils.load_checkpoint(str(full / "checkpoints" / "0000006.pt"))
    b = utils.load_checkpoint(str(resumed / "checkpoints" / "0000006.pt"))
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert a["step"] == b["step"] == 6 and len(b["rng"]) == nproc
    assert read_metrics(full)[-1]["train/loss"] == read_metrics(resumed)[-1]["train/loss"]
    if nproc == 2:
        log = (full / "log.txt").read_text()
        assert "world size 2" in log and "per-channel mean" in log
        meta = data.read_cache_meta(str(cache))
        assert b["generator"]["latent"]["mean"] == meta["channel_mean"] and b["generator"]["objective"]["path"] == "gvp"


def test_sigterm_saves_and_resume_continues(cache, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "train_dit.py", "--preset", "tiny", "--latents", str(cache), "--max-steps", "100000",
           "--log-every", "1", "--ckpt-every", "100000", "--sample-every", "0", "--run-dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.txt").exists() and "step 3/" in (run / "log.txt").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    step = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"]
    assert step >= 3 and "stop requested" in (run / "log.txt").read_text()
    out = run_cli(["--resume", str(run), "--max-steps", str(step + 1), "--sample-every", "0", "--num-workers", "0"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == step + 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cache, tmp_path, monkeypatch):
    import diffusion

    real = diffusion.GaussianDiffusion.training_losses
    calls = {"n": 0}

    def planted(self, *a, **k):
        terms = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(diffusion.GaussianDiffusion, "training_losses", planted)
    run = tmp_path / "run"
    args = train_dit.parse_args(["--preset", "tiny", "--latents", str(cache), "--max-steps", "6", "--ckpt-every", "2",
                                 "--log-every", "1", "--sample-every", "0", "--run-dir", str(run)])
    with pytest.raises(SystemExit) as e:
        train_dit.main(args)
    assert e.value.code == 3
    assert "non-finite loss or gradient at step 3" in (run / "log.txt").read_text()
    assert utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == 2
    assert not (run / "checkpoints" / "0000003.pt").exists()


def test_resume_takes_the_runs_flags_and_grids_decode_with_the_caches_autoencoder(cache, tmp_path, capsys):
    """A resumed run keeps its --precision (fp16: the loss scale too) and decodes its grids with the
    cache's autoencoder, not the preset's scratch spec: the same grid as the uninterrupted run."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--preset", "tiny", "--latents", str(cache), "--sample-every", "2", "--ckpt-every", "2"]
    assert run_cli([*common, "--precision", "fp16", "--max-steps", "4", "--run-dir", str(full)]).returncode == 0
    assert run_cli([*common, "--precision", "fp16", "--max-steps", "2", "--run-dir", str(resumed)]).returncode == 0
    out = run_cli(["--preset", "tiny", "--resume", str(resumed), "--max-steps", "4"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert (resumed / "log.txt").read_text().count("precision fp16") == 2
    a = utils.load_checkpoint(str(full / "checkpoints" / "latest.pt"))
    b = utils.load_checkpoint(str(resumed / "checkpoints" / "latest.pt"))
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    grid = lambda run: np.asarray(Image.open(run / "samples-0000004.png"))
    assert np.array_equal(grid(full), grid(resumed))

    # the run recorded its cache by absolute path; a cache of another autoencoder is refused on resume,
    # and a new run into the finished folder is refused (a requeued job without --resume)
    assert json.loads((resumed / "args.json").read_text())["latents"] == str(cache)
    other = tmp_path / "other"
    out = run_cli(["--preset", "tiny", "--latents", str(other), "--global-seed", "1", "--max-steps", "1",
                   "--sample-every", "0", "--run-dir", str(tmp_path / "o")])
    assert out.returncode == 0, out.stderr[-3000:]
    code, err = refusal(["--resume", str(resumed), "--latents", str(other), "--max-steps", "6"], capsys)
    assert code == 2 and "of another autoencoder than the resumed run's" in err
    # the same autoencoder on other images: the data order and the statistics would change
    more = tmp_path / "more"
    out = run_cli(["--preset", "tiny", "--latents", str(more), "--data-path", "builtin:shapes:40", "--vae",
                   str(cache / "autoencoder.pt"), "--max-steps", "1", "--sample-every", "0", "--run-dir", str(tmp_path / "m")])
    assert out.returncode == 0, out.stderr[-3000:]
    code, err = refusal(["--resume", str(resumed), "--latents", str(more), "--max-steps", "6"], capsys)
    assert code == 2 and "holds other images than the resumed run's cache" in err
    code, err = refusal([*common, "--max-steps", "2", "--run-dir", str(resumed)], capsys)
    assert code == 2 and f"continue it with --resume {resumed}" in err
    assert utils.load_checkpoint(str(resumed / "checkpoints" / "latest.pt"))["step"] == 4


def test_initial_weights_do_not_depend_on_whether_the_cache_was_built(cache, tmp_path):
    """The fixture's run built the cache before its model; this one finds the cache complete."""
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--latents", str(cache), "--max-steps", "1", "--sample-every", "0",
                   "--cache-shard-size", "10", "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    a = utils.load_checkpoint(str(cache.parent / "first" / "checkpoints" / "latest.pt"))["model"]
    b = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script", ["train_dit", "train_maskgit"])
@pytest.mark.parametrize("flags,message", [
    (["--num-workers", "-1"], "--num-workers must be 0"),
    (["--max-steps", "0"], "--max-steps must be a positive integer"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--image-size", "-8"], "--image-size must be a positive integer"),
    (["--ema-decay", "1"], "--ema-decay 1.0 is out of range"),
    (["--data-path", "builtin:shapes:3"], "builtin:shapes:3 has 3 images, fewer than one --global-batch-size 4"),
    (["--global-batch-size", "3", "--nproc", "2"], "--global-batch-size 3 must be positive and divisible by the 2 processes"),
])
def test_bad_counts_fail_in_check_args(script, flags, message, capsys):
    module = __import__(script)
    flags = list(flags)  # the parameter list is shared by both scripts' cases
    world_size = int(flags.pop(flags.index("--nproc") + 1)) if "--nproc" in flags else 1
    args = module.parse_args(["--preset", "tiny", *[f for f in flags if f != "--nproc"]])
    with pytest.raises(SystemExit) as e:
        module.check_args(args, world_size)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--class-dropout-prob", "0", "--cfg-scale", "4"], "needs the null class that label dropout trains"),
    (["--num-steps", "1"], "one respaced diffusion step samples at t = 0"),
    (["--preset", "tiny-repa", "--encoder-depth", "5"], "--encoder-depth 5: SiT-T/2 has 4 blocks"),
])
def test_grid_and_repa_flags_fail_before_the_cache(flags, message, capsys):
    preset = [] if "--preset" in flags else ["--preset", "tiny"]
    with pytest.raises(SystemExit):
        train_dit.check_args(train_dit.parse_args([*preset, *flags]), 1)
    assert message in capsys.readouterr().err


def test_diffusion_grids_refuse_more_steps_than_timesteps(capsys):
    with pytest.raises(SystemExit):
        train_dit.check_args(train_dit.parse_args(["--preset", "tiny", "--num-steps", "1001"]), 1)
    assert "at most the 1000 training timesteps" in capsys.readouterr().err
    train_dit.check_args(train_dit.parse_args(["--preset", "tiny", "--model", "SiT-T/2", "--num-steps", "1001"]), 1)


def test_init_from_loads_weights_and_refuses_a_mismatch(cache, tmp_path, capsys):
    src = tmp_path / "src"
    assert run_cli(["--preset", "tiny", "--latents", str(cache), "--max-steps", "2", "--sample-every", "0",
                    "--run-dir", str(src)]).returncode == 0
    run = tmp_path / "run"
    out = run_cli(["--preset", "tiny", "--latents", str(cache), "--max-steps", "1", "--lr", "0", "--sample-every", "1",
                   "--init-from", str(src / "checkpoints" / "latest.pt"), "--ema-decay", "0", "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    a = utils.load_checkpoint(str(src / "checkpoints" / "latest.pt"))["ema"]
    ckpt = utils.load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert all(torch.equal(a[k], ckpt["model"][k]) for k in a)  # lr 0: the starting weights survive unchanged
    # --ema-decay 0 keeps no EMA: the grid and sample.py's default --ema read the raw weights
    assert ckpt["ema"] is None and (run / "samples-0000001.png").exists()
    loaded, _ = models.load_generator(str(run / "checkpoints" / "latest.pt"), use_ema=True)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in loaded.state_dict().items())
    # resuming a run that kept an EMA with --ema-decay 0 drops it, and says so
    out = run_cli(["--resume", str(src), "--max-steps", "3", "--ema-decay", "0"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert utils.load_checkpoint(str(src / "checkpoints" / "latest.pt"))["ema"] is None
    assert "the resumed run's EMA is dropped" in (src / "log.txt").read_text()
    code, err = refusal(["--preset", "tiny", "--latents", str(cache), "--model", "DiT-S/2",
                        "--init-from", str(src / "checkpoints" / "latest.pt"), "--run-dir", str(tmp_path / "bad")], capsys)
    assert code == 2 and "--init-from" in err and "DiT-T/2" in err


def test_bad_input_fails_before_anything_is_written(cache, tmp_path, capsys):
    r = tmp_path / "r"
    code, err = refusal(["--preset", "tiny", "--latents", str(tmp_path / "empty"), "--data-path", str(tmp_path / "nowhere"),
                        "--results-dir", str(r)], capsys)
    assert code == 2 and "nowhere" in err
    code, err = refusal(["--latents", str(tmp_path / "empty"), "--results-dir", str(r)], capsys)
    assert code == 2 and "--data-path and --vae" in err
    code, err = refusal(["--preset", "tiny", "--latents", str(tmp_path / "vq"), "--vae", "scratch:tiny-vq", "--results-dir", str(r)], capsys)
    assert code == 2 and "VQ" in err
    code, err = refusal(["--preset", "tiny", "--latents", str(cache), "--lr", "-1", "--results-dir", str(r)], capsys)
    assert code == 2 and "--lr -1.0 is out of range" in err
    code, err = refusal(["--preset", "tiny", "--latents", str(cache), "--sampler", "sde", "--results-dir", str(r)], capsys)
    assert code == 2 and "does not fit --objective diffusion" in err
    code, err = refusal(["--preset", "tiny", "--latents", str(tmp_path / "empty"), "--data-path", "builtin:shapes:2",
                        "--results-dir", str(r)], capsys)  # refused before the 2 images are cached
    assert code == 2 and "builtin:shapes:2 has 2 images, fewer than one --global-batch-size 4" in err
    code, err = refusal(["--preset", "tiny", "--latents", str(tmp_path / "empty"), "--data-path", "builtin:circles",
                        "--results-dir", str(r)], capsys)
    assert code == 2 and "--data-path: unknown built-in dataset 'builtin:circles'" in err
    code, err = refusal(["--preset", "tiny", "--latents", str(tmp_path / "empty"), "--model", "DiT-T/4", "--image-size", "24",
                        "--results-dir", str(r)], capsys)  # refused before caching, not when the model is built
    assert code == 2 and "its 4x4 patches do not tile the 6x6 latents" in err
    code, err = refusal(["--latents", str(cache), "--image-size", "64", "--results-dir", str(r)], capsys)
    assert code == 2 and "holds 32 px images, not --image-size 64" in err
    assert not r.exists() and not (tmp_path / "empty").exists() and not (tmp_path / "vq" / "meta.json").exists()


def test_demo_preset_runs_end_to_end_on_another_autoencoder(tmp_path):
    """--preset demo with its data and steps shrunk: latents cached, DiT trained, the labelled grid
    copied to demo-dit/samples.png; upright shapes are not flipped. A --vae that is not the demo's
    own autoencoder is never replaced by a run of train_vae.py's demo."""
    vae = tmp_path / "ae.pt"
    models.save_autoencoder(models.load_autoencoder("scratch:tiny"), str(vae))
    shrink = ["--data-path", "builtin:shapes-upright:40", "--max-steps", "2", "--ckpt-every", "2", "--sample-every", "2",
              "--num-steps", "2", "--grid-rows", "1", "--log-every", "1", "--cache-batch-size", "40"]
    out = run_cli(["--preset", "demo", "--vae", str(vae), *shrink, "--results-dir", str(tmp_path)])
    assert out.returncode == 0, out.stderr[-3000:]
    demo = tmp_path / "demo-dit"
    with open(demo / "run" / "args.json") as f:
        args = json.load(f)
    assert args["flip"] is False and args["model"] == "DiT-T/2" and args["latent_norm"] == "channel"
    assert data.read_cache_meta(str(demo / "latents"))["count"] == 40
    from PIL import Image
    grid = Image.open(demo / "samples.png")
    assert grid.width >= 10 * 32 and f"{demo}/samples.png" in out.stdout
    # a rerun replaces demo-dit but for a cache given with --latents, even the previous demo's own
    # inside it (reused, not rebuilt), and writes its run to --run-dir
    (demo / "stale.txt").write_text("from the previous demo")
    out = run_cli(["--preset", "demo", "--vae", str(vae), *shrink, "--results-dir", str(tmp_path),
                   "--latents", str(demo / "latents"), "--run-dir", str(tmp_path / "again")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "caching" not in out.stderr and data.read_cache_meta(str(demo / "latents"))["count"] == 40
    assert not (demo / "run").exists() and not (demo / "stale.txt").exists()
    assert (tmp_path / "again" / "samples-0000002.png").is_file() and (demo / "samples.png").is_file()
    out = run_cli(["--preset", "demo", "--vae", str(tmp_path / "missing.pt"), *shrink, "--results-dir", str(tmp_path / "m")])
    assert out.returncode != 0 and "missing.pt" in out.stderr and "train_vae" not in out.stdout
    assert not (tmp_path / "m" / "demo").exists()


def test_demo_bad_flag_fails_before_the_autoencoder_demo_or_any_deletion(tmp_path, capsys):
    """A bad flag to --preset demo is refused before train_vae's demo would build a missing
    autoencoder and before the previous demo's folder is replaced."""
    (tmp_path / "demo-dit").mkdir()
    (tmp_path / "demo-dit" / "samples.png").write_bytes(b"kept")
    args = train_dit.parse_args(["--preset", "demo", "--lr", "-1", "--vae", "results/demo/eq-vae/autoencoder.pt",
                                 "--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        train_dit.run_demo(args)
    out = capsys.readouterr()
    assert "--lr -1.0 is out of range" in out.err and "training it first" not in out.out
    assert (tmp_path / "demo-dit" / "samples.png").read_bytes() == b"kept"
