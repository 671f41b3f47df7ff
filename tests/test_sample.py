"""sample.py through its real command line: the same bytes on 1 and 2 processes, resumable chunks,
labels and grids, bad input, and evaluate.py gen on its output."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import cli
from cli import ENV, ROOT
from test_train_dit import refusal as train_dit_refusal


def run(script, args, nproc=1, timeout=300, env=None):
    return cli.run(script, args, nproc=nproc, timeout=timeout, env=env)


def refusal(argv, capsys):
    import sample

    return train_dit_refusal(argv, capsys, module=sample)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A DiT (diffusion) and a SiT (transport) trained 4 steps on a tiny cache."""
    base = tmp_path_factory.mktemp("gen")
    out = {}
    for model in ("DiT-T/2", "SiT-T/2"):
        run_dir = base / model.replace("/", "-")
        res = run("train_dit.py", ["--preset", "tiny", "--model", model, "--latents", str(base / "latents"),
                                   "--sample-every", "0", "--run-dir", str(run_dir)])
        assert res.returncode == 0, res.stderr[-3000:]
        out[model] = str(run_dir / "checkpoints" / "latest.pt")
    return out


@pytest.mark.parametrize("model,sampler,nproc", [("DiT-T/2", "ddpm", 2), ("SiT-T/2", "sde", 1)])
def test_same_bytes_on_one_and_two_processes(ckpts, tmp_path, model, sampler, nproc):
    """The same .npz from 1 process and from 2 (DiT); from another chunk layout in one (SiT)."""
    common = ["--preset", "tiny", "--ckpt", ckpts[model], "--sampler", sampler, "--num-samples", "6", "--cfg-scale", "2.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = run("sample.py", [*common, "--per-proc-batch-size", "2", "--sample-dir", str(one)])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run("sample.py", [*common, "--per-proc-batch-size", "2" if nproc == 2 else "4", "--sample-dir", str(two)],
              nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    if nproc == 2:
        assert (one / "samples.npz").read_bytes() == (two / "samples.npz").read_bytes()
        # rank 0's refusal stops both ranks with its one line, not rank 1's broken-barrier traceback
        refused = run("sample.py", [*common[:-1], "3.0", "--per-proc-batch-size", "2", "--sample-dir", str(two)], nproc=2)
        assert refused.returncode != 0 and refused.stderr.count("holds samples made with other settings") == 1
        assert 'sample.py", line' not in refused.stderr, refused.stderr[-3000:]
    else:  # batches of 2 and of 4 compute the same samples (to float round-off, then uint8)
        a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
        assert np.array_equal(a["arr_1"], b["arr_1"]) and np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() <= 1
    samples = np.load(one / "samples.npz")
    assert samples["arr_0"].shape == (6, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    assert samples["arr_1"].shape == (6,) and samples["arr_1"].max() < 10
    assert (one / "preview.png").is_file() and not list(one.glob("chunk-*"))
    assert "evaluate.py gen" in res.stdout


def test_interrupted_sampling_keeps_finished_chunks(ckpts, tmp_path, capsys):
    common = ["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--num-samples", "8", "--per-proc-batch-size", "4"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run("sample.py", [*common, "--sample-dir", str(full)]).returncode == 0
    reference = np.load(full / "samples.npz")
    # what an interruption leaves: the settings and the first finished chunk (marked, to tell it
    # from a recomputed one)
    resumed.mkdir()
    shutil.copyfile(full / "settings.json", resumed / "settings.json")
    marked = reference["arr_0"][:4].copy()
    marked[:, 0, 0] = 7
    np.savez(resumed / "chunk-0000000-0000004.npz", arr_0=marked, arr_1=reference["arr_1"][:4])
    res = run("sample.py", [*common, "--sample-dir", str(resumed)])
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(resumed / "samples.npz")
    assert np.array_equal(got["arr_0"][:4], marked)  # kept, not recomputed
    assert np.array_equal(got["arr_0"][4:], reference["arr_0"][4:])
    assert np.array_equal(got["arr_1"], reference["arr_1"])
    # the same folder with other settings is refused, nothing overwritten
    code, err = refusal([*common, "--num-steps", "3", "--sample-dir", str(resumed)], capsys)
    assert code == 2 and "other settings" in err and "num_steps" in err
    assert np.array_equal(np.load(resumed / "samples.npz")["arr_0"], got["arr_0"])


def test_many_chunks_assemble_under_a_low_open_file_limit(ckpts, tmp_path, capsys):
    """The final .npz reads its chunks one at a time: 300 finished chunks assemble under a limit of
    256 open files (a cluster's usual 1,024 is 32 samples x 1,024 = a third of a 50k run). Chunks
    without the settings.json that says how they were made are refused."""
    import resource

    common = ["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"]]
    first, folder = tmp_path / "first", tmp_path / "many"
    assert run("sample.py", [*common, "--num-samples", "1", "--sample-dir", str(first)]).returncode == 0
    folder.mkdir()
    for i in range(300):
        np.savez(folder / f"chunk-{i:07d}-{i + 1:07d}.npz", arr_0=np.full((1, 32, 32, 3), i % 256, np.uint8),
                 arr_1=np.array([i % 10]))
    code, err = refusal([*common, "--num-samples", "300", "--sample-dir", str(folder)], capsys)
    assert code == 2 and "no settings.json" in err
    settings = json.loads((first / "settings.json").read_text())
    (folder / "settings.json").write_text(json.dumps(dict(settings, num_samples=300)))
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))  # noqa: E731
    res = subprocess.run([sys.executable, "sample.py", *common, "--num-samples", "300", "--sample-dir", str(folder)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(folder / "samples.npz")
    assert np.array_equal(got["arr_0"][:, 0, 0, 0], np.arange(300) % 256) and np.array_equal(got["arr_1"], np.arange(300) % 10)


def test_labels_class_balanced_and_a_labelled_grid(ckpts, tmp_path):
    res = run("sample.py", ["--preset", "tiny", "--ckpt", ckpts["SiT-T/2"], "--sampler", "heun", "--num-samples", "12",
                            "--class-balanced", "--sample-dir", str(tmp_path / "balanced")])
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "balanced" / "samples.npz")["arr_1"], np.arange(12) % 10)
    res = run("sample.py", ["--preset", "tiny", "--ckpt", ckpts["SiT-T/2"], "--sampler", "euler", "--class-labels", "0",
                            "3", "9", "--grid-rows", "2", "--sample-dir", str(tmp_path / "grid")])
    assert res.returncode == 0, res.stderr[-3000:]
    from PIL import Image

    grid = Image.open(tmp_path / "grid" / "grid.png")
    assert grid.width > 3 * 128 and grid.height > 2 * 128  # 3 labelled columns, 2 rows, enlarged
    assert not (tmp_path / "grid" / "samples.npz").exists()


def test_bad_input_and_offline_released_weights(ckpts, tmp_path, capsys):
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--sampler", "euler", "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "does not fit this diffusion model" in err
    code, err = refusal(["--preset", "tiny", "--ckpt", str(tmp_path / "missing.pt"), "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "missing.pt" in err
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--class-labels", "10", "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "--class-labels" in err
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--num-steps", "1001", "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "take 2 to the model's 1000 training timesteps" in err
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--num-steps", "1", "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "t = 0 on pure noise" in err
    (tmp_path / "a-file").write_text("")
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--sample-dir", str(tmp_path / "a-file")], capsys)
    assert code == 2 and "is not a writable folder" in err and "Traceback" not in err
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--vae", str(tmp_path / "gone.pt"),
                         "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and f"--vae {tmp_path / 'gone.pt'} failed to load" in err
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--cfg-channels", "5", "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "has 4 latent channels" in err  # a fifth would guide the variance
    code, err = refusal(["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--vae", "scratch:tiny-vq", "--sample-dir", str(tmp_path / "a")], capsys)
    assert code == 2 and "continuous (KL) autoencoder, which scratch:tiny-vq is not" in err
    env = dict(ENV, EQVAE_CACHE=str(tmp_path / "cache"), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    res = run("sample.py", ["--ckpt", "DiT-XL/2-256", "--sample-dir", str(tmp_path / "a")], env=env)
    assert res.returncode == 2
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in res.stderr
    assert os.path.join(str(tmp_path / "cache"), "generators", "DiT-XL-2-256x256.pt") in res.stderr
    assert not (tmp_path / "a").exists()
    import sample
    with pytest.raises(SystemExit) as e:  # a negative count would guide the wrong channels
        sample.parse_args(["--ckpt", ckpts["DiT-T/2"], "--cfg-channels", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # uniform codes, not greedy decoding
        sample.parse_args(["--ckpt", ckpts["DiT-T/2"], "--sm-temp", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:  # beyond int64 once multiplied by 1,000,003: a crash at the first batch
        sample.parse_args(["--ckpt", ckpts["DiT-T/2"], "--global-seed", str(10**13)])
    assert e.value.code == 2


def test_a_sample_folder_follows_the_weights_not_the_path(ckpts, tmp_path):
    """checkpoints/latest.pt changes while training runs: a folder sampled from other weights at the
    same path is refused, not topped up or returned as it is. A folder whose first attempt wrote only
    settings.json (it failed before a sample) takes the new settings. A model trained without label
    dropout has no null class: guidance is refused before anything is written."""
    import torch

    import utils

    ckpt = tmp_path / "latest.pt"
    shutil.copy(ckpts["DiT-T/2"], ckpt)
    common = ["--preset", "tiny", "--ckpt", str(ckpt), "--num-samples", "2", "--sample-dir", str(tmp_path / "s")]
    assert run("sample.py", common).returncode == 0
    state = utils.load_checkpoint(str(ckpt))
    state["ema"]["final_layer.linear.bias"] += 1.0
    torch.save(state, ckpt)
    res = run("sample.py", common)
    assert res.returncode == 2 and "weights_hash" in res.stderr
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "settings.json").write_text(json.dumps({"cfg_scale": 9.0}))
    res = run("sample.py", [*common[:-1], str(tmp_path / "t")])
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "t" / "settings.json").read_text())["cfg_scale"] == 1.0
    state["ema"]["y_embedder.embedding_table.weight"] = state["ema"]["y_embedder.embedding_table.weight"][:10]
    state["model"]["y_embedder.embedding_table.weight"] = state["model"]["y_embedder.embedding_table.weight"][:10]
    state["generator"]["config"]["class_dropout_prob"] = 0.0
    torch.save(state, ckpt)
    res = run("sample.py", [*common[:-1], str(tmp_path / "u"), "--cfg-scale", "2"])
    assert res.returncode == 2 and "no null class to guide with" in res.stderr and not (tmp_path / "u").exists()


def test_evaluate_gen_scores_the_npz(ckpts, tmp_path):
    res = run("sample.py", ["--preset", "tiny", "--ckpt", ckpts["DiT-T/2"], "--sample-dir", str(tmp_path / "s")])
    assert res.returncode == 0, res.stderr[-3000:]
    ref = tmp_path / "ref.npz"
    res = run("evaluate.py", ["ref", "--data-path", "builtin:shapes:8", "--image-size", "32", "--out", str(ref),
                              "--inception-weights", "random", "--preset", "tiny"])
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "gen.json"
    res = run("evaluate.py", ["gen", "--ref", str(ref), "--sample", str(tmp_path / "s" / "samples.npz"),
                              "--inception-weights", "random", "--preset", "tiny", "--sqrtm", "eigh", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert np.isfinite(result["fid"]) and result["fid"] > 0
