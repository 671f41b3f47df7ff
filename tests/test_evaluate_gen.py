"""evaluate.py, generation metrics: our Inception against pytorch-fid's, the metrics against
pytorch-fid and closed forms, input handling, and the real CLI in 1 and 2 processes.

Run from the repo root: python -m pytest -q tests/test_evaluate_gen.py
"""
import json
import os
import pickle
import sys
import tracemalloc
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import evaluate as ev  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return ev.load_inception("random", "cpu")


def run_cli(args, cwd, nproc=1):
    return cli.run("evaluate.py", args, nproc=nproc, cwd=cwd, env={"EQVAE_CACHE": str(cwd / "cache")}, timeout=300)


# ----------------------------------------------------------------------------- TF1 resize


def tf1_resize_reference(img, out_h, out_w):
    """TensorFlow 1's legacy ResizeBilinear written out from its kernel's formula, in float32:
    src = i * (in / out); lower = floor(src), upper = min(ceil(src), in - 1), lerp = src - floor(src);
    top = tl + (tr - tl) * xl; bottom = bl + (br - bl) * xl; out = top + (bottom - top) * yl.
    img: float32 (H, W, C)."""
    H, W, _ = img.shape

    def axis(n_in, n_out):
        src = np.arange(n_out, dtype=np.float32) * (np.float32(n_in) / np.float32(n_out))
        lower = np.floor(src).astype(np.int64)
        upper = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
        return lower, upper, (src - np.floor(src)).astype(np.float32)

    y0, y1, yl = axis(H, out_h)
    x0, x1, xl = axis(W, out_w)
    out = np.empty((out_h, out_w, img.shape[2]), np.float32)
    for i in range(out_h):
        tl, tr, bl, br = img[y0[i], x0], img[y0[i], x1], img[y1[i], x0], img[y1[i], x1]  # (out_w, C)
        top = tl + (tr - tl) * xl[:, None]
        bottom = bl + (br - bl) * xl[:, None]
        out[i] = top + (bottom - top) * yl[i]
    return out


@pytest.mark.parametrize("shape,size", [((256, 256), (299, 299)), ((13, 17), (29, 31)), ((320, 300), (299, 299))])
def test_tf1_resize_is_bit_exact_against_the_formula(shape, size):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(*shape, 3)).astype(np.float32)
    ours = ev.tf1_resize_bilinear(torch.from_numpy(img).permute(2, 0, 1)[None], size)[0].permute(1, 2, 0).numpy()
    ref = tf1_resize_reference(img, *size)
    assert np.array_equal(ours, ref)
    # and it is not what F.interpolate computes (pytorch-fid's residual error)
    torch_resize = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)
    assert np.abs(torch_resize[0].permute(1, 2, 0).numpy() - ref).max() > 1.0


def test_preprocess_maps_uint8_to_graph_range():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat(299 * 299 * 3 // 3 + 1)[: 299 * 299 * 3].reshape(1, 299, 299, 3)
    y = ev.preprocess(x, "cpu")
    assert y.shape == (1, 3, 299, 299)
    assert y.min().item() == -1.0 and y.max().item() == 127 / 128  # (x - 128) / 128, as in the graph
    with pytest.raises(ValueError, match="uint8"):
        ev.preprocess(x.float(), "cpu")


# ----------------------------------------------------------------------------- Inception vs pytorch-fid


def test_inception_matches_pytorch_fid(model, monkeypatch):
    pfi = pytest.importorskip("pytorch_fid.inception")
    state = ev.random_inception_weights(0)  # what load_inception("random") loads
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = pfi.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True).eval()
    taps = {}
    mixed_6d = theirs.blocks[2][6]  # block 2 = Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e
    mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("conv", o))

    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8))
    x = ev.preprocess(images, "cpu")
    ours = ev.inception_features(model, images)  # fused batch norm, channels_last
    with torch.no_grad():
        pool = theirs(x.contiguous())[0].flatten(1)

    def close(a, b, tol=1e-5):
        return (a - b).abs().max().item() <= tol * b.abs().max().item()

    assert pool.abs().max() > 0.1  # random weights still give non-trivial features
    assert close(ours["pool"], pool)
    spatial = taps["conv"][:, : ev.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(3, -1)  # TF's HWC order
    assert ours["spatial"].shape == (3, 2023) and close(ours["spatial"], spatial)
    assert close(ours["logits"], pool @ state["fc.weight"].t())  # no bias, as ADM's IS
    assert not close(ours["logits"], pool @ state["fc.weight"].t() + state["fc.bias"])


def test_load_inception_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="random"):
        ev.load_inception(str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError, match="not pytorch-fid's Inception weights"):
        ev.load_inception(str(bad))
    with pytest.raises(ValueError, match="CUDA"):
        ev.load_inception("random", "cpu", precision="tf32")
    # no network: the error names the URL, where to put the file, and the offline flag
    monkeypatch.setenv("EQVAE_CACHE", str(tmp_path / "cache"))

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as err:
        ev.load_inception(ev.INCEPTION_WEIGHTS)
    msg = str(err.value)
    assert ev.INCEPTION_URL in msg and str(tmp_path / "cache" / ev.INCEPTION_WEIGHTS) in msg and "random" in msg


def test_weights_file_round_trip(tmp_path, model):
    """A weights file in pytorch-fid's format (without num_batches_tracked, as old saves) loads, with
    each batch norm folded into its conv."""
    state = {k: v for k, v in ev.random_inception_weights(3).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(state, path)
    a = ev.load_inception(str(path))
    assert a.info["comparable"] and a.info["id"].startswith("pt_inception.pth:")
    assert torch.equal(a.fc.weight, state["fc.weight"]) and not torch.equal(model.fc.weight, state["fc.weight"])
    conv = a.Mixed_6d.branch1x1.conv
    scale = state["Mixed_6d.branch1x1.bn.weight"] / torch.sqrt(state["Mixed_6d.branch1x1.bn.running_var"] + 1e-3)
    torch.testing.assert_close(conv.weight, state["Mixed_6d.branch1x1.conv.weight"] * scale[:, None, None, None])
    torch.testing.assert_close(conv.bias, state["Mixed_6d.branch1x1.bn.bias"] - state["Mixed_6d.branch1x1.bn.running_mean"] * scale)


# ----------------------------------------------------------------------------- Frechet distance


def random_stats(rng, n, d):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return ev.compute_statistics(x)


def test_fid_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = random_stats(rng, 200, 24), random_stats(rng, 150, 24)
    try:  # pytorch-fid passes sqrtm(disp=False): deprecated in SciPy 1.16, removed in 1.18
        with pytest.warns(DeprecationWarning) if _scipy_warns_disp() else _nothing():
            theirs = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    except TypeError as e:
        pytest.skip(f"pytorch-fid's calculate_frechet_distance fails with this SciPy: {e}")
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-12)
    assert ev.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(theirs, rel=1e-9)


def _scipy_warns_disp():
    import warnings

    from scipy import linalg

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            linalg.sqrtm(np.eye(2), disp=False)
        except TypeError:
            return False
    return any(issubclass(x.category, DeprecationWarning) for x in w)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_fid_eigh_path_on_rank_deficient_statistics():
    """Fewer images than dimensions (the tiny CLI runs): the eigh path drops round-off eigenvalues
    and stays within scipy's own accuracy on singular products."""
    rng = np.random.default_rng(11)
    (mu1, s1), (mu2, s2) = random_stats(rng, 10, 64), random_stats(rng, 12, 64)
    assert np.linalg.matrix_rank(s1) == 9
    assert ev.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(ev.frechet_distance(mu1, s1, mu2, s2), rel=1e-5)


def test_fid_of_gaussians_closed_form():
    """Covariances that share eigenvectors Q: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert ev.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-9)
    # from samples of the two Gaussians, the estimate converges to the closed form
    x1 = rng.normal(size=(20000, d)) * np.sqrt(a) @ q.T + mu1
    x2 = rng.normal(size=(20000, d)) * np.sqrt(b) @ q.T + mu2
    assert ev.frechet_distance(*ev.compute_statistics(x1), *ev.compute_statistics(x2)) == pytest.approx(expected, rel=0.05)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    mu, sigma = random_stats(rng, 300, 32)
    assert 0 <= ev.frechet_distance(mu, sigma, mu, sigma) < 1e-8
    assert 0 <= ev.frechet_distance(mu, sigma, mu, sigma, method="eigh") < 1e-8
    # few samples: rank-deficient statistics, whose round-off took the distance to -3e-5
    few = rng.normal(size=(3, 64))
    mu3, sigma3 = few.mean(0), np.cov(few, rowvar=False)
    assert ev.frechet_distance(mu3, sigma3, mu3, sigma3) == pytest.approx(0.0, abs=1e-3)
    assert ev.frechet_distance(mu3, sigma3, mu3, sigma3) >= 0
    with pytest.raises(ValueError, match="different dimensions"):
        ev.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_fid_retries_with_eps_and_checks_the_imaginary_part(monkeypatch):
    """ADM's fallbacks: a non-finite sqrtm is retried with eps on both diagonals (with a warning);
    a complex result passes only if its diagonal's imaginary part is within 1e-3 of 0."""
    rng = np.random.default_rng(10)
    (mu1, s1), (mu2, s2) = random_stats(rng, 100, 6), random_stats(rng, 100, 6)
    real_sqrtm, calls = ev.linalg.sqrtm, []

    def first_call_fails(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(ev.linalg, "sqrtm", first_call_fails)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        fid = ev.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(6)) @ (s2 + 1e-6 * np.eye(6)))
    assert fid == pytest.approx(ev.frechet_distance(mu1, s1, mu2, s2, method="eigh"), rel=1e-6)
    monkeypatch.setattr(ev.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-4j)  # small imaginary part: accepted
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid, rel=1e-6)
    monkeypatch.setattr(ev.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-2j)
    with pytest.raises(ValueError, match="imaginary component"):
        ev.frechet_distance(mu1, s1, mu2, s2)


def test_running_stats_equal_np_cov():
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(101, 17)).astype(np.float32)
    acc = ev.RunningStats(17, "cpu")
    for i in range(0, 101, 8):
        acc.update(torch.from_numpy(x[i : i + 8]))
    mu, sigma = acc.finalize()
    mu_ref, sigma_ref = ev.compute_statistics(x)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_limits():
    C = 10
    confident = np.eye(C)[np.arange(50) % C]  # one-hot, every class equally often
    assert ev.inception_score(confident) == pytest.approx(C, rel=1e-12)
    identical = np.tile(np.random.default_rng(0).dirichlet(np.ones(C)), (50, 1))
    assert ev.inception_score(identical) == pytest.approx(1.0, rel=1e-12)
    # consecutive splits, averaged: one split scores C, the other 1
    assert ev.inception_score(np.concatenate([confident[:10], identical[:10]]), split_size=10) == pytest.approx((C + 1) / 2)


def test_inception_probs_use_weights_without_bias():
    rng = np.random.default_rng(4)
    pool, w = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    p = ev.inception_probs(pool, w)
    logits = pool @ w.T
    np.testing.assert_allclose(p, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), rtol=1e-5)
    assert p.dtype == np.float64 and np.allclose(p.sum(1), 1, rtol=1e-12)


# ----------------------------------------------------------------------------- precision / recall


def brute_force_pr(ref, sample, k):
    d = lambda a, b: ((a[:, None, :].astype(np.float64) - b[None].astype(np.float64)) ** 2).sum(-1)  # noqa: E731
    r_ref, r_sample = np.sort(d(ref, ref), 1)[:, k], np.sort(d(sample, sample), 1)[:, k]
    d_rs = d(ref, sample)
    return (d_rs <= r_ref[:, None]).any(0).mean(), (d_rs <= r_sample[None]).any(1).mean()


def test_precision_recall_of_a_set_with_itself_and_far_clusters():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 2048)).astype(np.float32)
    assert ev.precision_recall(x, x) == (1.0, 1.0)
    far = x[:10] + 100.0  # float16 squared norms overflow here: exercises ADM's float32 fallback
    assert ev.precision_recall(x[10:], far) == (0.0, 0.0)


def test_precision_recall_hand_checked():
    """k=1 on a line. Reference {0, 1, 3}: squared radii {1, 1, 4}. Samples {0.5, 0.75, 6}: squared
    radii {0.0625, 0.0625, 27.5625}. Precision: 0.5 (0.25 <= 1 from 0) and 0.75 yes, 6 no (9 > 4 from 3)
    -> 2/3. Recall: 0 no (0.25 > 0.0625 from 0.5, 36 > 27.5625 from 6); 1 yes, exactly on the sphere of
    0.75 (0.0625 <= 0.0625); 3 yes (9 <= 27.5625 from 6) -> 2/3."""
    ref = np.array([[0.0], [1.0], [3.0]], np.float32)
    sample = np.array([[0.5], [0.75], [6.0]], np.float32)
    for fp16 in (True, False):
        p, r = ev.precision_recall(ref, sample, k=1, fp16_distances=fp16)
        assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_precision_recall_blocks_match_brute_force():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(23, 5)).astype(np.float32)
    sample = (rng.normal(size=(17, 5)) * 1.5 + 0.5).astype(np.float32)
    expected = brute_force_pr(ref, sample, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case where both can be wrong
    assert ev.precision_recall(ref, sample, block_size=4, fp16_distances=False) == pytest.approx(expected)
    # float16 distances (ADM's default) agree with their own unblocked computation
    assert ev.precision_recall(ref, sample, block_size=4) == ev.precision_recall(ref, sample, block_size=1000)
    with pytest.raises(ValueError, match="at least 4"):
        ev.precision_recall(ref[:3], sample)


# ----------------------------------------------------------------------------- inputs


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(5, 9, 11, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images, arr_1=np.arange(5))
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    np.savez(tmp_path / "later.npz", mu=np.zeros(7), arr_0=images)  # arr_0 not the first member
    plain, packed = ev.open_images(str(tmp_path / "plain.npz")), ev.open_images(str(tmp_path / "packed.npz"))
    later = ev.open_images(str(tmp_path / "later.npz"))
    assert plain.offset is not None and later.offset is not None and packed.offset is None  # memory-mapped vs loaded
    for ds in (plain, packed, later):
        assert len(ds) == 5 and ds.image_size == (9, 11)
        assert np.array_equal(np.stack([ds[i] for i in range(5)]), images)
    # a DataLoader worker gets a picklable copy without the open memmap
    loader = torch.utils.data.DataLoader(plain, batch_size=2, num_workers=1, collate_fn=ev._stack)
    assert np.array_equal(torch.cat(list(loader)).numpy(), images)


def test_bad_inputs_are_refused_with_a_clear_message(tmp_path):
    rng = np.random.default_rng(8)
    cases = {
        "float.npz": (rng.uniform(-1, 1, size=(4, 8, 8, 3)).astype(np.float32), r"float32.*uint8.*127\.5"),
        "nchw.npz": (rng.integers(0, 256, size=(4, 3, 8, 8), dtype=np.uint8), r"NCHW.*transpose\(0, 2, 3, 1\)"),
        "unit.npz": (rng.integers(0, 2, size=(4, 8, 8, 3), dtype=np.uint8), r"\[0, 1\]"),
        "gray.npz": (rng.integers(0, 256, size=(4, 8, 8), dtype=np.uint8), r"\(N, H, W, 3\).*np\.repeat\(x\[\.\.\., None\], 3"),
        "gray1.npz": (rng.integers(0, 256, size=(4, 1, 8, 8), dtype=np.uint8), r"transpose\(0, 2, 3, 1\) then np\.repeat"),
        "rgba.npz": (rng.integers(0, 256, size=(4, 8, 8, 4), dtype=np.uint8), r"RGBA: composite on white"),
        "bool.npz": (rng.integers(0, 2, size=(4, 8, 8, 3)).astype(bool), r"x\.astype\(np\.uint8\) \* 255"),
    }
    for name, (arr, pattern) in cases.items():
        np.savez(tmp_path / name, arr_0=arr)
        with pytest.raises(ev.InputError, match=pattern):
            ev.open_images(str(tmp_path / name))
    np.savez(tmp_path / "nokey.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ev.InputError, match="no `arr_0`"):
        ev.open_images(str(tmp_path / "nokey.npz"))
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    Image.new("RGB", (16, 12)).save(folder / "b.png")
    with pytest.raises(ev.InputError, match=r"a\.png is 16x16 but .*b\.png is 16x12"):
        ev.open_images(str(folder))
    with pytest.raises(ev.InputError, match="does not exist"):
        ev.open_images(str(tmp_path / "nowhere.npz"))
    with pytest.raises(ev.InputError, match="at least 2"):
        ev._few_images_note(1, "sample x")
    assert "NOT comparable" in ev._few_images_note(100, "sample x")


def test_batch_starting_with_black_images_is_accepted_all_dark_is_refused(tmp_path):
    """The [0, 1]-cast refusal looks at the whole batch, not its first read: black images first (as
    far as the first read chunk and beyond) are scored, as ADM scores them."""
    rng = np.random.default_rng(12)
    n = ev.NPZ_SCAN_IMAGES + 6
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    images[: ev.NPZ_SCAN_IMAGES + 3] = 0
    for save in (np.savez, np.savez_compressed):  # memory-mapped and streamed reads
        save(tmp_path / "dark.npz", arr_0=images)
        ds = ev.open_images(str(tmp_path / "dark.npz"))
        assert len(ds) == n and np.array_equal(ds[n - 1], images[-1]) and ds[0].max() == 0
        unit = rng.integers(0, 2, size=images.shape, dtype=np.uint8)  # every image 0/1: [0, 1] floats cast to uint8
        save(tmp_path / "unit.npz", arr_0=unit)
        with pytest.raises(ev.InputError, match=rf"unit\.npz \(arr_0\): all {n} uint8 images have only the values 0 and 1"):
            ev.open_images(str(tmp_path / "unit.npz"))
        unit[-1, 0, 0, 0] = 2  # one brighter value in the last image: the batch is not all 0/1
        save(tmp_path / "unit.npz", arr_0=unit)
        assert len(ev.open_images(str(tmp_path / "unit.npz"))) == n


class PeakMemory(torch.utils.data.Dataset):
    """Items of `dataset` with the peak traced allocation (tracemalloc: Python objects and numpy
    arrays) of the process that read them, counted from that process's first item."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        return self.dataset[index], os.getpid(), tracemalloc.get_traced_memory()[1]


def test_compressed_npz_is_streamed_not_loaded_per_worker(tmp_path):
    """A compressed arr_0 is never held whole: not by the main process (open, then read through a
    pickled copy: what a spawn/forkserver DataLoader worker gets), nor by 2 forked workers, each of
    whose peak allocation stays far below one copy of the array. Images come back in order, also
    after the main process has opened a reader of its own before the fork."""
    images = np.random.default_rng(13).integers(0, 256, size=(2048, 64, 64, 3), dtype=np.uint8)  # 25 MB
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images)
    limit = images.nbytes / 8
    tracemalloc.start()
    try:
        ds = ev.open_images(str(tmp_path / "packed.npz"))
        assert ds.stream and ds.offset is None
        opened = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        copy = pickle.loads(pickle.dumps(ds))
        assert np.array_equal(copy[1900], images[1900]) and np.array_equal(copy[7], images[7])  # forward, then back
        read = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert opened < limit and read < limit, (opened, read, images.nbytes)
    assert np.array_equal(ds[3], images[3])  # the main process now holds an open reader
    loader = torch.utils.data.DataLoader(PeakMemory(ds), batch_size=4, num_workers=2, collate_fn=list)
    items = [item for batch in loader for item in batch]
    assert np.array_equal(np.stack([img for img, _, _ in items]), images)
    peaks = {}
    for _, pid, peak in items:
        peaks[pid] = max(peaks.get(pid, 0), peak)
    assert len(peaks) == 2 and os.getpid() not in peaks
    assert max(peaks.values()) < limit, (peaks, images.nbytes)


def test_compressed_sample_features_with_two_workers(tmp_path, model, gen_batches, capsys):
    """extract_features on a compressed .npz with --num-workers 2 gives the features of its images in
    order, read by one worker (more would each inflate the whole stream), and says so."""
    _, sample, _, sample_feats = gen_batches
    np.savez_compressed(tmp_path / "packed.npz", arr_0=sample)
    features, _ = ev.extract_features(model, ev.open_images(str(tmp_path / "packed.npz")), batch_size=2, num_workers=2)
    np.testing.assert_allclose(features["pool"], sample_feats["pool"], rtol=1e-5, atol=1e-4)
    assert "packed.npz: arr_0 is compressed, so one DataLoader worker reads it in order" in capsys.readouterr().out


def test_extract_features_keeps_masked_rows_and_exact_stats(model):
    images = ev.open_images("builtin:shapes:4", image_size=32)
    batch = np.stack([images[i] for i in range(4)])
    direct = ev.inception_features(model, batch)
    mask = np.array([1, 0, 1, 1], bool)
    features, stats = ev.extract_features(model, images, batch_size=3, num_workers=0, keep=("pool", "logits"),
                                          stats=("spatial",), keep_mask=mask)
    assert features["pool"].shape == (3, 2048) and features["logits"].shape == (3, 1008)
    np.testing.assert_allclose(features["pool"], direct["pool"][torch.from_numpy(mask)].numpy(), rtol=1e-5, atol=1e-4)
    mu, sigma = ev.compute_statistics(direct["spatial"].numpy())
    np.testing.assert_allclose(stats["spatial"][0], mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["spatial"][1], sigma, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- stored statistics (ADM's rules)


@pytest.fixture(scope="module")
def gen_batches(model):
    """6 reference images (shapes) and 6 sample images (noise), 32 px, with their direct Inception features."""
    shapes = ev.open_images("builtin:shapes:6", image_size=32)
    ref = np.stack([shapes[i] for i in range(6)])
    sample = np.random.default_rng(14).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    feats = [{k: v.double().numpy() for k, v in ev.inception_features(model, x).items()} for x in (ref, sample)]
    return ref, sample, feats[0], feats[1]


def unit_stats(dim, shift=0.0, scale=1.0):
    """mu = shift * ones, sigma = scale * I: the Frechet distance of two such is closed-form."""
    return np.full(dim, shift), scale * np.eye(dim)


def fid_against_identity(features):
    """FID of a feature set's statistics against mu = 0, sigma = I: |mu|^2 + tr S + D - 2 sum sqrt(eig S)."""
    mu, sigma = ev.compute_statistics(features)
    eig = np.clip(np.linalg.eigvalsh(sigma), 0, None)
    return mu @ mu + np.trace(sigma) + len(mu) - 2 * np.sqrt(eig).sum()


def evaluate(model, ref, sample):
    return ev.evaluate_generation(model, str(ref), str(sample), batch_size=6, num_workers=0, sqrtm="eigh")


def test_reference_without_mu_s_gives_no_sfid(tmp_path, model, gen_batches):
    """mu/sigma but no mu_s/sigma_s: FID from the file's mu/sigma, no sFID (ADM stops; never sFID from
    arr_0), a note saying so, and no few-images note for the reference (its FID statistics are not
    computed from its 6 images); precision/recall still use arr_0."""
    ref, sample, _, sample_feats = gen_batches
    mu, sigma = unit_stats(ev.POOL_DIM)
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=mu, sigma=sigma)
    np.savez(tmp_path / "sample.npz", arr_0=sample)
    metrics, notes = evaluate(model, tmp_path / "ref.npz", tmp_path / "sample.npz")
    assert metrics["sfid"] is None
    assert metrics["fid"] == pytest.approx(fid_against_identity(sample_feats["pool"]), rel=1e-5)
    assert metrics["ref_statistics"] == "mu, sigma from the file (no mu_s, sigma_s: no sFID)"
    assert metrics["sample_statistics"] == "computed from 6 images"
    assert any("no mu_s/sigma_s: sFID not computed" in n for n in notes)
    assert [n for n in notes if "fewer than" in n] == [ev._few_images_note(6, f"sample {tmp_path / 'sample.npz'}")]
    assert metrics["precision"] is not None and metrics["num_ref_images"] == 6


def test_reference_with_only_mu_s_uses_images_for_both(tmp_path, model, gen_batches, monkeypatch):
    """mu_s/sigma_s without mu: as ADM, both FID and sFID statistics are those of the 6 images (the
    file's mu_s is ignored, with a note, and never mixed with image statistics), also when a feature
    cache written by an older version lacks the spatial statistics."""
    ref, _, ref_feats, _ = gen_batches
    path = str(tmp_path / "spatial.npz")
    np.savez(path, arr_0=ref, **dict(zip(("mu_s", "sigma_s"), unit_stats(ev.SPATIAL_DIM))))
    stale = ev._cache_path(path, ev._features_key(path, model))
    np.savez(stale, pool=np.zeros((6, ev.POOL_DIM), np.float32), mu=np.zeros(ev.POOL_DIM), sigma=np.eye(ev.POOL_DIM))
    out = ev.reference_batch(path, model, batch_size=6, num_workers=0)
    assert out["stats_from"] == "images" and out["cache"] == stale
    for (m, s), kind in ((("mu", "sigma"), "pool"), (("mu_s", "sigma_s"), "spatial")):
        mu, sigma = ev.compute_statistics(ref_feats[kind])
        np.testing.assert_allclose(out[m], mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[s], sigma, rtol=1e-4, atol=1e-4)
    assert np.abs(out["mu_s"]).max() > 0.01  # not the file's mu_s = 0
    assert len(out["notes"]) == 1 and "has mu_s/sigma_s but no mu/sigma" in out["notes"][0] and "ignored" in out["notes"][0]
    with np.load(stale) as f:  # the stale cache was rewritten with what this run needs
        assert {"pool", "mu", "sigma", "mu_s", "sigma_s"} <= set(f.files) and np.abs(f["pool"]).max() > 0
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: pytest.fail("the rewritten cache was not used"))
    again = ev.reference_batch(path, model, batch_size=6, num_workers=0)  # now a hit, with the same statistics
    assert again["cache"] == stale and np.array_equal(again["sigma_s"], out["sigma_s"])


def test_sample_statistics_are_used_as_adm(tmp_path, model, gen_batches):
    """A sample .npz with mu/sigma/mu_s/sigma_s is scored from them (closed form against a reference
    with mu = 0, sigma = I: FID = D * shift^2 + D * (1 + s - 2 sqrt(s))), IS and precision/recall
    from its images; without mu_s there is no sFID; wrong shapes are refused naming the file."""
    ref, sample, _, sample_feats = gen_batches
    (ref_mu, ref_sigma), (ref_mu_s, ref_sigma_s) = unit_stats(ev.POOL_DIM), unit_stats(ev.SPATIAL_DIM)
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=ref_mu, sigma=ref_sigma, mu_s=ref_mu_s, sigma_s=ref_sigma_s)
    mu, sigma = unit_stats(ev.POOL_DIM, shift=0.5, scale=4.0)
    mu_s, sigma_s = unit_stats(ev.SPATIAL_DIM, shift=1.0)
    np.savez(tmp_path / "sample.npz", arr_0=sample, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    metrics, notes = evaluate(model, tmp_path / "ref.npz", tmp_path / "sample.npz")
    fid = ev.POOL_DIM * 0.5**2 + ev.POOL_DIM * (1 + 4 - 2 * 2)
    assert metrics["fid"] == pytest.approx(fid, rel=1e-9)
    assert metrics["sfid"] == pytest.approx(ev.SPATIAL_DIM * 1.0, rel=1e-9)
    probs = ev.inception_probs(sample_feats["pool"], model.fc.weight.detach())
    assert metrics["is"] == pytest.approx(ev.inception_score(probs), rel=1e-5)
    assert metrics["precision"] is not None and metrics["num_images"] == 6
    assert metrics["sample_statistics"] == "mu, sigma, mu_s, sigma_s from the file"
    assert any("stores mu/sigma: its FID and sFID statistics are the file's" in n for n in notes)
    assert not any("fewer than" in n for n in notes)  # no statistic was computed from few images
    np.savez(tmp_path / "sample_mu.npz", arr_0=sample, mu=mu, sigma=sigma)
    metrics, notes = evaluate(model, tmp_path / "ref.npz", tmp_path / "sample_mu.npz")
    assert metrics["sfid"] is None and metrics["fid"] == pytest.approx(fid, rel=1e-9)
    assert any("sample_mu.npz has mu/sigma but no mu_s/sigma_s: sFID not computed" in n for n in notes)
    np.savez(tmp_path / "bad.npz", arr_0=sample, mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ev.InputError, match=r"bad\.npz: `mu` \(10,\) and `sigma` \(10, 10\) are not FID statistics.*\(2048,\)"):
        ev.stored_sample_statistics(ev.open_images(str(tmp_path / "bad.npz")))
    np.savez(tmp_path / "half.npz", arr_0=sample, mu=mu)
    with pytest.raises(ev.InputError, match=r"half\.npz has `mu` but not `sigma`"):
        ev.stored_sample_statistics(ev.open_images(str(tmp_path / "half.npz")))


# ----------------------------------------------------------------------------- the CLI, 1 and 2 processes


N_CLI = 8  # images in the CLI tests' reference and sample batches


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """ref from builtin:shapes; a sample batch half shapes (another seed), half noise; gen once
    in one process and once on 2."""
    tmp = tmp_path_factory.mktemp("evaluate_cli")
    ref = run_cli(["ref", "--data-path", f"builtin:shapes:{N_CLI}", "--image-size", "32", "--out", "ref.npz",
                   "--inception-weights", "random", "--preset", "tiny"], tmp)
    assert ref.returncode == 0, ref.stderr
    shapes = ev.open_images(f"builtin:shapes:{N_CLI // 2}:1", image_size=32)
    noise = np.random.default_rng(9).integers(0, 256, size=(N_CLI // 2, 32, 32, 3), dtype=np.uint8)
    sample = np.concatenate([np.stack([shapes[i] for i in range(N_CLI // 2)]), noise])
    np.savez(tmp / "sample.npz", arr_0=sample, arr_1=np.zeros(N_CLI, np.int64))
    common = ["gen", "--ref", "ref.npz", "--sample", "sample.npz", "--inception-weights", "random", "--preset", "tiny", "--sqrtm", "eigh"]
    single = run_cli(common + ["--out", "single.json"], tmp)
    assert single.returncode == 0, single.stderr
    multi = run_cli(common + ["--out", "multi.json"], tmp, nproc=2)
    assert multi.returncode == 0, multi.stderr
    return tmp, ref, single, multi


def test_cli_ref_writes_an_adm_reference_batch(cli_run, model):
    tmp, ref, _, _ = cli_run
    assert "not comparable to anything" in ref.stdout
    with np.load(tmp / "ref.npz") as f:
        assert set(f.files) == {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s"}
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (N_CLI, 32, 32, 3)
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
        assert f["mu_s"].shape == (2023,) and f["sigma_s"].shape == (2023, 2023)
        images = ev.open_images(f"builtin:shapes:{N_CLI}", image_size=32)
        direct = np.stack([images[i] for i in range(N_CLI)])
        assert np.array_equal(f["arr_0"], direct)  # the ADM crop's uint8 pixels, unchanged
        feats = ev.inception_features(model, direct)
        mu, sigma = ev.compute_statistics(feats["pool"].numpy())
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(f["mu_s"], feats["spatial"].numpy().mean(0), rtol=1e-5, atol=1e-5)


def test_cli_gen_one_and_two_processes_agree(cli_run):
    tmp, _, single, multi = cli_run
    a, b = json.loads((tmp / "single.json").read_text()), json.loads((tmp / "multi.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    for key in ("fid", "sfid", "is"):
        assert np.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=1e-5)
    assert a["fid"] > 0 and a["is"] >= 1.0
    assert (a["precision"], a["recall"]) == (b["precision"], b["recall"])
    assert a["recall"] < 1.0  # with so few points, k=3 radii are wide: only recall drops here
    assert a["num_images"] == N_CLI and a["num_ref_images"] == N_CLI
    assert a["inception_weights"] == "random" and a["comparable_with_papers"] is False
    assert "not comparable to anything" in single.stdout and "FID" in single.stdout
    assert any("fewer than 2048" in n for n in a["notes"])
    assert a["ref_statistics"] == "mu, sigma, mu_s, sigma_s from the file"  # `ref` stores all four
    assert a["sample_statistics"] == f"computed from {N_CLI} images"
    # the reference's features come from the cache that `ref` seeded
    assert a["ref_feature_cache"] and Path(tmp / a["ref_feature_cache"]).is_file()


def test_reference_cache_matches_fresh_features(cli_run, model):
    tmp, *_ = cli_run
    cached = ev.reference_batch(str(tmp / "ref.npz"), model, batch_size=8, num_workers=0)
    fresh = ev.reference_batch(str(tmp / "ref.npz"), model, batch_size=5, num_workers=0, use_cache=False)
    assert cached["cache"] and fresh["cache"] is None and cached["stats_from"] == "file"
    np.testing.assert_allclose(cached["pool"], fresh["pool"], rtol=1e-5, atol=1e-4)


def test_folder_sample_equals_npz_sample_and_cli(cli_run, model):
    tmp, *_ = cli_run
    with np.load(tmp / "sample.npz") as f:
        arr = f["arr_0"]
    folder = tmp / "sample_png"
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(arr):
        Image.fromarray(img).save(folder / f"{i:06d}.png")
    from_png, _ = ev.evaluate_generation(model, str(tmp / "ref.npz"), str(folder), batch_size=8, num_workers=0, sqrtm="eigh")
    from_npz = json.loads((tmp / "single.json").read_text())  # the CLI on sample.npz
    for key in ("fid", "sfid", "is", "precision", "recall"):
        assert from_png[key] == pytest.approx(from_npz[key], rel=1e-5)


def test_a_damaged_feature_cache_is_recomputed(cli_run, model):
    """A cut-short cache file (a bad copy, a full disk) is a miss, rewritten, not a crash forever after."""
    tmp, *_ = cli_run
    good = ev.reference_batch(str(tmp / "ref.npz"), model, batch_size=8, num_workers=0)
    cache = good["cache"]
    with open(cache, "rb") as f:
        head = f.read(1000)
    with open(cache, "wb") as f:
        f.write(head)
    with pytest.warns(UserWarning, match="unreadable"):
        again = ev.reference_batch(str(tmp / "ref.npz"), model, batch_size=8, num_workers=0)
    np.testing.assert_allclose(again["pool"], good["pool"], rtol=1e-5, atol=1e-4)
    with np.load(cache) as f:  # rewritten whole
        assert "pool" in f.files


def test_an_unwritable_result_place_is_refused_before_the_work(tmp_path):
    np.savez(tmp_path / "two.npz", arr_0=np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "file").write_text("x")
    r = run_cli(["gen", "--ref", "two.npz", "--sample", "two.npz", "--inception-weights", "random",
                 "--out", "file/metrics.json"], tmp_path)
    assert r.returncode == 2 and "is not writable: pass --out" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["recon", "--vae", "scratch:tiny", "--data-path", "builtin:shapes:2", "--image-size", "32",
                 "--out", "file/recon.json"], tmp_path)
    assert r.returncode == 2 and "is not writable" in r.stderr


def test_cli_refuses_too_few_images(tmp_path):
    np.savez(tmp_path / "one.npz", arr_0=np.full((1, 8, 8, 3), 100, np.uint8))
    r = run_cli(["gen", "--ref", "one.npz", "--sample", "one.npz", "--inception-weights", "random"], tmp_path)
    assert r.returncode == 2 and "at least 2" in r.stderr and "Traceback" not in r.stderr
