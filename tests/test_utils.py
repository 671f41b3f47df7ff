"""Distributed setup, atomic checkpoints, RNG state, EMA and the weight cache."""
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_torchrun(script, nproc=2, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))


def test_two_process_gloo_setup_all_reduce_cleanup(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        import utils
        rank, world, device = utils.setup_distributed()
        assert dist.get_backend() == "gloo" and world == 2
        mean = utils.all_reduce_mean({"x": float(rank + 1), "y": 10.0 * rank}, device)
        print(f"rank={rank} main={utils.is_main()} x={mean['x']} y={mean['y']}", flush=True)
        utils.cleanup()
        utils.cleanup()  # safe twice
    """))
    out = run_torchrun(str(script))
    assert out.returncode == 0, out.stderr
    assert "rank=0 main=True x=1.5 y=5.0" in out.stdout
    assert "rank=1 main=False x=1.5 y=5.0" in out.stdout


def test_single_process_without_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    code = "import utils; r, w, d = utils.setup_distributed(); print(r, w, d.type); utils.cleanup()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["0", "1", "cpu"], out.stderr


def test_killed_save_never_replaces_previous_checkpoint(tmp_path):
    path = tmp_path / "latest.pt"
    utils.save_checkpoint({"step": 1, "w": torch.ones(3)}, str(path))
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, torch, utils
        real_save = torch.save
        def dying_save(obj, f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of writing
        torch.save = dying_save
        utils.save_checkpoint({{"step": 2, "w": torch.zeros(3)}}, {str(path)!r})
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert out.returncode == -9
    ckpt = utils.load_checkpoint(str(path))
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    utils.seed_everything(3)
    state = utils.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    utils.save_checkpoint({"rng": state}, str(tmp_path / "rng.pt"))
    utils.seed_everything(99)
    utils.set_rng_state(utils.load_checkpoint(str(tmp_path / "rng.pt"))["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_ema_update_closed_form():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.detach().clone()
    utils.update_ema(ema, model, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * before + 0.1 * model.weight.detach())


def test_weight_cache_uses_file_in_place_and_names_path_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path))

    def no_network(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(utils.urllib.request, "urlopen", no_network)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "weights.pth").write_bytes(b"x")
    assert utils.download("https://example.invalid/weights.pth", "w/weights.pth") == str(tmp_path / "w" / "weights.pth")
    with pytest.raises(RuntimeError) as e:
        utils.download("https://example.invalid/other.pth", "w/other.pth")
    assert "https://example.invalid/other.pth" in str(e.value) and str(tmp_path / "w" / "other.pth") in str(e.value)
    assert not (tmp_path / "w" / "other.pth.part").exists()


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        utils.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pt"):
        utils.load_checkpoint(str(tmp_path / "bad.pt"))


def test_non_checkpoint_files_are_named_not_unpickled(tmp_path):
    """Random bytes and a cut-off torch.save file are called what they are, before any unpickling
    (a file of garbage must not be met with the advice to pass --trust-checkpoint)."""
    noise, cut = tmp_path / "noise.pt", tmp_path / "cut.pt"
    noise.write_bytes(bytes(range(256)) * 4)
    torch.save({"w": torch.ones(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:1500])
    with pytest.raises(RuntimeError, match="not a PyTorch checkpoint .neither"):
        utils.load_checkpoint(str(noise))
    with pytest.raises(RuntimeError, match="truncated zip"):
        utils.load_checkpoint(str(cut), trust_checkpoint=True)


def test_labelled_grid_names_the_rows_in_a_left_margin(tmp_path):
    """row_labels widen the grid by a margin that holds text beside each row, and only there."""
    from PIL import Image

    columns = [torch.full((2, 3, 32, 32), v) for v in (0.2, 0.8)]
    utils.save_labelled_grid(columns, ["x", "y"], tmp_path / "plain.png", min_size=32)
    utils.save_labelled_grid(columns, ["x", "y"], tmp_path / "rows.png", min_size=32, row_labels=["control", "EQ-VAE"])
    plain, rows = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "rows.png")
    margin = 6 * len("control") + 8
    assert rows.size == (plain.width + margin, plain.height)
    ink = (np.asarray(rows.convert("L"))[:, :margin] < 128).any(1)  # rows of pixels with text in the margin
    header, cell = 16, 34
    assert ink[header:header + cell].any() and ink[header + cell:header + 2 * cell].any() and not ink[:header].any()
    assert np.array_equal(np.asarray(rows)[:, margin:], np.asarray(plain))  # the grid itself is unchanged


def _one_step(loss_fn, scaler, w):
    opt = torch.optim.SGD([w], lr=0.1)
    return utils.optimizer_step(loss_fn(w), [w], opt, scaler, 0.0, False, torch.device("cpu"))


def test_optimizer_step_updates_with_the_unclipped_norm():
    w = torch.nn.Parameter(torch.ones(3))
    grad_norm, nonfinite, stop_now = _one_step(lambda w: (3 * w).sum(), torch.amp.GradScaler("cpu", enabled=False), w)
    assert torch.allclose(w.detach(), torch.full((3,), 1 - 0.1 * 3)) and not nonfinite and not stop_now
    assert grad_norm.item() == pytest.approx(3 * 3 ** 0.5)


def test_optimizer_step_fp16_overflow_is_skipped_not_fatal():
    # a scale so large that the scaled gradient overflows: the scaler skips the update and halves
    # the scale, as fp16 training expects on its first steps; only the loss is checked
    scaler, w = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127), torch.nn.Parameter(torch.ones(3))
    grad_norm, nonfinite, stop_now = _one_step(lambda w: (4 * w).sum(), scaler, w)
    assert not torch.isfinite(grad_norm) and not nonfinite and not stop_now
    assert torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() == 2.0 ** 126


def test_optimizer_step_nan_gradient_is_reported_and_not_applied():
    # without a scaler (bf16/fp32) a NaN gradient under a finite loss would be applied
    w = torch.nn.Parameter(torch.ones(3))
    w.register_hook(lambda g: torch.full_like(g, float("nan")))
    _, nonfinite, _ = _one_step(lambda w: w.sum(), torch.amp.GradScaler("cpu", enabled=False), w)
    assert nonfinite and torch.equal(w.detach(), torch.ones(3))


def test_epoch_plan_drops_the_remainder_and_names_the_data():
    assert utils.epoch_plan(100, "x", 8, 2, None, 3) == (4, 12, 36)  # 100 // 2 // 4 = 12 steps an epoch
    assert utils.epoch_plan(100, "x", 8, 2, 5, 3) == (4, 12, 5)  # --max-steps wins
    assert utils.epoch_plan(100, "x", 8, 1, None, 1, grad_accum=4) == (8, 3, 3)
    with pytest.raises(SystemExit) as fail:
        utils.epoch_plan(7, "the cache c", 8, 1, None, 1)
    assert fail.value.code == 2


def test_metrics_write_non_finite_values_as_null(tmp_path):
    import argparse
    import json

    _, logger, _ = utils.open_run(argparse.Namespace(lr=1.0, run_dir=str(tmp_path / "run")), None, "run", 1, "cpu", "fp32")
    logger.metrics(3, {"train/grad_norm": float("inf"), "train/loss": float("nan"), "train/lr": 0.5})
    logger.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1],
                        parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert record == {"step": 3, "train/grad_norm": None, "train/loss": None, "train/lr": 0.5}


def test_open_run_picks_the_given_the_resumed_or_a_new_numbered_folder(tmp_path):
    import argparse

    args = argparse.Namespace(lr=1.0, run_dir=None, results_dir=str(tmp_path / "results"))
    resumed = tmp_path / "old" / "checkpoints" / "0000004.pt"
    picked = [utils.open_run(args, None, "DiT-S/2", 1, "cpu", "fp32")[0],
              utils.open_run(args, None, "DiT-S/2", 1, "cpu", "fp32")[0],
              utils.open_run(args, str(resumed), "DiT-S/2", 1, "cpu", "fp32")[0],
              utils.open_run(argparse.Namespace(**dict(vars(args), run_dir=str(tmp_path / "mine"))), str(resumed),
                             "x", 2, "cpu", "bf16")[0]]
    assert [os.path.relpath(p, tmp_path) for p in picked] == [os.path.join("results", "000-DiT-S-2"),
                                                               os.path.join("results", "001-DiT-S-2"), "old", "mine"]
    first = (tmp_path / "mine" / "log.txt").read_text().splitlines()[0]
    assert first.endswith(f"run folder {tmp_path / 'mine'}; world size 2; device cpu; precision bf16")
    assert (tmp_path / "old" / "args.json").exists() and (tmp_path / "old" / "checkpoints").is_dir()


def test_interval_log_averages_each_interval_and_logs_the_last_step(tmp_path):
    import argparse
    import json

    _, logger, _ = utils.open_run(argparse.Namespace(run_dir=str(tmp_path)), None, "run", 1, "cpu", "fp32")
    log = utils.IntervalLog(logger, every=3, max_steps=7, images_per_step=8, device=torch.device("cpu"))
    for step in range(1, 8):  # steps 1-3, 4-6 and the last one, 7, each logged once
        log.add(step, 0.1 * step, dict(loss=torch.tensor(float(step)), eq_steps=float(step % 2)))
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 7]
    assert [r["train/loss"] for r in records] == [2.0, 5.0, 7.0]
    assert [r["train/eq_steps"] for r in records] == pytest.approx([2 / 3, 1 / 3, 1.0])
    assert [r["train/lr"] for r in records] == pytest.approx([0.3, 0.6, 0.7])
    assert records[0]["train/images_per_sec"] == pytest.approx(8 * records[0]["train/steps_per_sec"])
    assert [utils.due(s, 3, 7) for s in range(1, 8)] == [False, False, True, False, False, True, True]
    assert not any(utils.due(s, 0, 7) for s in range(1, 8))  # --sample-every 0: never, not even at the end


def test_fp16_run_whose_gradients_never_become_finite_stops():
    """A gradient that is inf even unscaled: the scaler skips every update and halves its scale;
    once it is below 1 (17 steps from 65536) the step reports non-finite, so the run stops instead
    of finishing 'done' having learned nothing."""
    scaler, w = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), torch.nn.Parameter(torch.ones(3))
    w.register_hook(lambda g: torch.full_like(g, float("inf")))
    flags = [_one_step(lambda w: w.sum(), scaler, w)[1] for _ in range(18)]
    assert flags == [False] * 16 + [True] * 2 and torch.equal(w.detach(), torch.ones(3))


def test_resume_drops_the_metrics_of_steps_trained_again(tmp_path):
    import argparse
    import json

    _, logger, _ = utils.open_run(argparse.Namespace(lr=1.0, run_dir=str(tmp_path / "run")), None, "run", 1, "cpu", "fp32")
    for step in range(1, 7):
        logger.metrics(step, {"train/loss": 1.0 / step})
    logger.metrics_file.write('{"step": 7, "train/lo')  # what a kill in the middle of a write leaves
    logger.metrics_file.flush()
    logger.drop_after(4)  # resumed from the step-4 checkpoint: steps 5 and 6 are trained again
    logger.metrics(5, {"train/loss": 0.5})
    logger.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_checkpoints_follow_the_umask_and_a_failed_write_names_the_path(tmp_path, monkeypatch):
    """mkstemp creates files 0600, which would hide a shared cache's autoencoder.pt from teammates;
    a write that fails (a full disk) is one error naming the file, and leaves no temp file."""
    old = os.umask(0o022)
    try:
        utils.save_checkpoint({"x": torch.ones(1)}, str(tmp_path / "a.pt"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644

    def full_disk(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        utils.save_checkpoint({"x": torch.ones(1)}, str(tmp_path / "b.pt"))
    assert e.value.code == 2 and sorted(os.listdir(tmp_path)) == ["a.pt"]


def test_a_failing_rank_ends_the_job_at_once_with_its_error(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: cleanup in the `finally` skips its barrier,
    so the error reaches torchrun at once instead of both ranks waiting for the gloo timeout."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import torch
        import torch.distributed as dist
        import utils
        rank, world, device = utils.setup_distributed()
        try:
            if rank == 1:
                raise RuntimeError("planted failure on rank 1")
            dist.all_reduce(torch.ones(1))
        finally:
            utils.cleanup()
    """))
    import time

    start = time.time()
    out = run_torchrun(str(script), timeout=100)
    assert out.returncode != 0 and "planted failure on rank 1" in out.stderr and time.time() - start < 60


def test_output_folders_are_checked_before_any_work(tmp_path, capsys):
    import argparse

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "0000002.pt").write_bytes(b"x")
    (tmp_path / "file").write_text("x")
    for args, message in ((dict(run_dir=str(run), resume=None), "holds a run already: continue it with --resume"),
                          (dict(run_dir=None, resume=None, results_dir=str(tmp_path / "file" / "sub")), "not a writable folder")):
        with pytest.raises(SystemExit) as e:
            utils.check_output_folders(argparse.Namespace(**args))
        assert e.value.code == 2 and message in capsys.readouterr().err
    utils.check_output_folders(argparse.Namespace(run_dir=str(run), resume=str(run), results_dir=str(tmp_path / "new" / "x")))


def serve(routes):
    """A local HTTP server in a thread: routes {path: (content type, body, declared length)}; returns
    (base URL, GET counts per path, server)."""
    import http.server
    import threading

    counts = {path: 0 for path in routes}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            counts[self.path] += 1
            kind, body, length = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", counts, server


def test_download_keeps_only_whole_files_and_fetches_once(tmp_path, monkeypatch):
    """A transfer that ends before Content-Length (http.client ends it without an error) and a web
    page in place of the file are refused and leave nothing in the cache; a file wanted by several
    threads at once is fetched once (the cache lock), and readable as the umask allows."""
    import threading

    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path))
    body = bytes(range(256)) * 40
    base, counts, server = serve({"/cut": ("application/octet-stream", body[:5000], len(body)),
                                  "/page": ("text/html", b"<html>rate limited</html>", 25),
                                  "/whole": ("application/octet-stream", body, len(body))})
    try:
        for route, message in (("/cut", "stopped after 5000 of 10240 bytes"), ("/page", "a web page, not the file")):
            with pytest.raises(RuntimeError, match=message):
                utils.download(base + route, f"w{route}.pt")
            assert not (tmp_path / "w" / f"{route[1:]}.pt").exists()
            assert not any(name.startswith(route[1:] + ".pt.part") for name in os.listdir(tmp_path / "w"))
        paths = []
        threads = [threading.Thread(target=lambda: paths.append(utils.download(base + "/whole", "w/whole.pt"))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.shutdown()
    assert counts["/whole"] == 1 and len(paths) == 4 and len(set(paths)) == 1
    assert (tmp_path / "w" / "whole.pt").read_bytes() == body
    assert (tmp_path / "w" / "whole.pt").stat().st_mode & 0o777 == utils.shared_mode()


def test_a_pickle_not_written_by_torch_is_not_offered_trust(tmp_path):
    import pickle

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(RuntimeError, match="a pickle, but not one torch.save wrote") as e:
        utils.load_checkpoint(str(tmp_path / "plain.pkl"))
    assert "--trust-checkpoint" not in str(e.value)
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    assert torch.equal(utils.load_checkpoint(str(tmp_path / "legacy.pt"))["w"], torch.ones(2))


def test_run_folders_are_claimed_so_jobs_started_together_get_their_own(tmp_path, monkeypatch):
    """Two jobs that list the results folder before either writes its run would pick the same
    number: the folder is claimed with an exclusive mkdir, and the second job takes the next one."""
    (tmp_path / "004-DiT-XL-2-diffusion").mkdir()
    first = utils.make_run_dir(str(tmp_path), "DiT-XL/2-diffusion")
    assert first == str(tmp_path / "005-DiT-XL-2-diffusion") and os.path.isdir(first)
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: [d for d in real_listdir(path) if not d.startswith("005")])
    second = utils.make_run_dir(str(tmp_path), "DiT-XL/2-diffusion")  # its listing predates the first's folder
    assert second == str(tmp_path / "006-DiT-XL-2-diffusion") and os.path.isdir(second)
