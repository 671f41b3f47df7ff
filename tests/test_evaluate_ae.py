"""evaluate.py, autoencoder analysis: PSNR against its closed form, SSIM against scikit-image, LPIPS
against the lpips package, the equivariance error of exactly equivariant toy encoders, intrinsic
dimension of known manifolds, and the real CLI (recon, equiv, id, figures) in 1 and 2 processes.

Run from the repo root: python -m pytest -q tests/test_evaluate_ae.py
"""
import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import evaluate as ev  # noqa: E402
import models  # noqa: E402


def run_cli(args, cwd, nproc=1):
    return cli.run("evaluate.py", args, nproc=nproc, cwd=cwd, env={"EQVAE_CACHE": str(cwd / "cache")}, timeout=400)


def uint8_images(rng, n, h, w, lo=0, hi=256):
    """Random uint8 images as [-1, 1] floats (exactly what data.py makes of uint8 pixels) and the uint8 values."""
    u8 = torch.from_numpy(rng.integers(lo, hi, size=(n, 3, h, w))).to(torch.uint8)
    return u8.double() / 127.5 - 1.0, u8


# ----------------------------------------------------------------------------- PSNR


def test_psnr_of_known_uniform_noise_is_the_closed_form():
    """Noise taking each value of {-a, ..., a} on exactly as many pixels: MSE = a (a + 1) / 3 exactly,
    so PSNR = 10 log10(255^2 / (a (a + 1) / 3)). Pixels stay inside [a, 255 - a]: no clipping."""
    rng = np.random.default_rng(0)
    a, n, h, w = 3, 4, 32, 35  # 3 * 32 * 35 = 3360 pixels, 480 of each of the 7 noise values
    x, u8 = uint8_images(rng, n, h, w, lo=a, hi=256 - a)
    values = np.repeat(np.arange(-a, a + 1), 3 * h * w // (2 * a + 1))
    noise = torch.from_numpy(np.stack([rng.permutation(values) for _ in range(n)]).reshape(n, 3, h, w))
    y = (u8.long() + noise).double() / 127.5 - 1.0
    expected = 10 * math.log10(255.0**2 / (a * (a + 1) / 3))
    for protocol in ev.AE_PROTOCOLS:
        psnr = ev.reconstruction_metrics(x, y, protocol)["psnr"]
        assert psnr.shape == (n,) and torch.allclose(psnr, torch.full((n,), expected, dtype=torch.float64), rtol=1e-6)


def test_psnr_of_an_exact_reconstruction_is_infinite_and_reported(tmp_path):
    x, _ = uint8_images(np.random.default_rng(1), 2, 16, 16)
    m = ev.reconstruction_metrics(x, x.clone())
    assert torch.isinf(m["psnr"]).all() and (m["psnr"] > 0).all()
    assert torch.allclose(m["ssim"], torch.ones(2, dtype=torch.float64))
    # the table says inf, the JSON keeps it (Python's json writes and reads Infinity)
    assert "inf" in ev.format_table(["vae", "PSNR"], [["a", float(m["psnr"].mean())]]).split()
    ev.write_json(str(tmp_path / "r.json"), {"psnr": float(m["psnr"].mean())})
    assert math.isinf(json.loads((tmp_path / "r.json").read_text())["psnr"])


# ----------------------------------------------------------------------------- SSIM


def skimage_ssim(x, y, data_range):
    """scikit-image's SSIM with the Wang et al. settings, per image; x, y (N, C, H, W)."""
    from skimage.metrics import structural_similarity

    to_hwc = lambda t: t[i].permute(1, 2, 0).double().numpy()  # noqa: E731
    out = []
    for i in range(len(x)):
        r = float(data_range[i]) if torch.is_tensor(data_range) else data_range
        out.append(structural_similarity(to_hwc(x), to_hwc(y), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=r, channel_axis=-1))
    return torch.tensor(out, dtype=torch.float64)


def test_ssim_matches_scikit_image():
    pytest.importorskip("skimage")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 40, 37, generator=g, dtype=torch.float64)
    y = (0.7 * x + 0.3 * torch.rand(3, 3, 40, 37, generator=g, dtype=torch.float64)).clamp(0, 1)
    y[1] = torch.rand(3, 40, 37, generator=g, dtype=torch.float64)  # an unrelated pair too
    ours = ev.ssim(x, y, data_range=1.0)
    assert torch.allclose(ours, skimage_ssim(x, y, 1.0), atol=1e-4, rtol=0)
    assert (ours - skimage_ssim(x, y, 1.0)).abs().max() < 1e-10  # in fact to round-off
    assert torch.allclose(ev.ssim(x, x), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="11x11"):
        ev.ssim(x[..., :10, :10], y[..., :10, :10])


def test_ssim_conventions_of_both_protocols_match_scikit_image():
    """ours: uint8 images / 255, data_range 1. eqvae: the unclamped floats, data_range per image
    as torchmetrics infers it (the larger of the two images' max - min)."""
    pytest.importorskip("skimage")
    rng = np.random.default_rng(3)
    x, u8 = uint8_images(rng, 2, 24, 24)
    rec = x + torch.from_numpy(rng.normal(0, 0.2, size=x.shape))  # leaves [-1, 1]: clamping matters
    ours = ev.reconstruction_metrics(x, rec, "ours")["ssim"]
    rec_u8 = models.to_uint8(rec).double()
    assert torch.allclose(ours, skimage_ssim(u8.double() / 255, rec_u8 / 255, 1.0), atol=1e-4, rtol=0)
    official = ev.reconstruction_metrics(x, rec, "eqvae")["ssim"]
    span = lambda t: t.flatten(1).amax(1) - t.flatten(1).amin(1)  # noqa: E731
    assert torch.allclose(official, skimage_ssim(rec, x, torch.maximum(span(rec), span(x))), atol=1e-4, rtol=0)
    assert not torch.allclose(ours, official, atol=1e-3)


# ----------------------------------------------------------------------------- LPIPS


@pytest.mark.filterwarnings("ignore::UserWarning")  # lpips still passes torchvision's deprecated `pretrained=`
def test_lpips_equals_the_lpips_package():
    lpips = pytest.importorskip("lpips")
    rng = np.random.default_rng(4)
    x, _ = uint8_images(rng, 2, 64, 64)
    rec = x + torch.from_numpy(rng.normal(0, 0.3, size=x.shape))
    torch.manual_seed(0)
    ours_net = models.load_lpips(random_backbone=True)
    torch.manual_seed(0)
    theirs = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        official = theirs(rec.float(), x.float()).flatten().double()
        quantized = theirs(models.to_uint8(rec).float() / 127.5 - 1, models.to_uint8(x).float() / 127.5 - 1).flatten().double()
    assert official.min() > 0
    got_official = ev.reconstruction_metrics(x, rec, "eqvae", ours_net)["lpips"]
    got_ours = ev.reconstruction_metrics(x, rec, "ours", ours_net)["lpips"]
    assert torch.allclose(got_official, official, rtol=1e-5) and torch.allclose(got_ours, quantized, rtol=1e-5)


# ----------------------------------------------------------------------------- equivariance error


class BoxAE:
    """A toy 'autoencoder' generic over f: E = box filter (average of f x f blocks; identity for f=1),
    D = nearest upsampling. Box windows commute exactly with quarter turns, and with area
    downscaling wherever the windows align."""

    kind = "kl"

    def __init__(self, f):
        self.downsample_factor = f

    def encode_features(self, x):
        return F.avg_pool2d(x, self.downsample_factor) if self.downsample_factor > 1 else x.clone()

    def encode(self, x):
        return SimpleNamespace(mean=self.encode_features(x))

    def decode(self, z):
        return F.interpolate(z, scale_factor=self.downsample_factor, mode="nearest")


def dyadic_images(n, size, seed):
    """Pixels k / 8: every box average and area resampling below is exact in float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (n, 3, size, size), generator=g).float() / 8


def test_equivariance_error_is_zero_for_exactly_equivariant_encoders():
    x = dyadic_images(3, 64, 5)
    # f = 1 (E = identity): tau E(x) = E(tau x) for every tau and interpolation, the paper's bicubic included
    e = ev.equivariance_errors(BoxAE(1), x)
    assert torch.equal(e["rotation"], torch.zeros(3, dtype=torch.float64)) and torch.equal(e["scale"], torch.zeros(3, dtype=torch.float64))
    # f = 4 box filter: exact for rotations; for scales with area resampling where the boxes align
    box = BoxAE(4)
    assert torch.equal(ev.equivariance_errors(box, x)["rotation"], torch.zeros(3, dtype=torch.float64))
    per_scale = {s: models.equivariance_error(box, x, [models.eq_transform(16, 16, scale=s)], "area") for s in models.EQ_EVAL_SCALES}
    assert torch.equal(per_scale[0.25], torch.zeros(3)) and torch.equal(per_scale[0.5], torch.zeros(3))
    assert (per_scale[0.75] > 0).all()  # 16 -> 12 latents, 64 -> 48 pixels: box windows do not align
    scale = ev.equivariance_errors(box, x, interp="area")["scale"]
    assert torch.allclose(scale, sum(per_scale.values()).double() / 3)


def test_equivariance_error_of_a_random_kl_model_over_the_stated_sets(monkeypatch):
    torch.manual_seed(0)
    ae = models.build_autoencoder(models.AE_configs["tiny"]).eval()
    x = dyadic_images(2, 64, 6)
    seen = []
    real = models.equivariance_error
    monkeypatch.setattr(models, "equivariance_error", lambda m, x, ts, *a: seen.append(list(ts)) or real(m, x, ts, *a))
    e = ev.equivariance_errors(ae, x)
    assert (e["rotation"] > 0).all() and (e["scale"] > 0).all()
    rot, sc = seen  # T_r = {pi/2, pi, 3pi/2} and T_s = {0.25, 0.5, 0.75} on the 16x16 latent
    assert [(t.k, t.new_h, t.new_w) for t in rot] == [(1, 16, 16), (2, 16, 16), (3, 16, 16)]
    assert [(t.k, t.new_h, t.new_w) for t in sc] == [(0, 4, 4), (0, 8, 8), (0, 12, 12)]
    # Delta written out: mean over tau of ||tau E(x) - E(tau x)||^2 / ||E(tau x)||^2, E = posterior mean
    with torch.no_grad():
        z = ae.encode(x).mean
        for kind, ts in (("rotation", rot), ("scale", sc)):
            terms = []
            for t in ts:
                a = models.apply_eq_transform(z, t)
                b = ae.encode(models.apply_eq_transform(x, t)).mean
                terms.append(((a - b) ** 2).sum((1, 2, 3)) / (b**2).sum((1, 2, 3)))
            assert torch.allclose(e[kind], torch.stack(terms).mean(0).double(), rtol=1e-5)


# ----------------------------------------------------------------------------- intrinsic dimension


def manifold(kind, d, n, seed, ambient=100):
    """n points on a d-dimensional linear subspace (Gaussian coordinates) or on the unit d-sphere
    (uniform), randomly rotated into `ambient` dimensions."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(ambient, ambient, generator=g, dtype=torch.float64))
    if kind == "subspace":
        return torch.randn(n, d, generator=g, dtype=torch.float64) @ q[:d]
    s = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    return (s / s.norm(dim=1, keepdim=True)) @ q[: d + 1]


@pytest.mark.parametrize("kind", ["subspace", "sphere"])
def test_intrinsic_dimension_of_known_manifolds(kind):
    for d in (2, 5, 10):
        result = ev.intrinsic_dimension(manifold(kind, d, 5000, seed=d).float())
        assert result["duplicates"] == 0 and result["num_points"] == 5000
        for name in ("mle", "twonn"):
            assert abs(result[name] - d) <= 0.1 * d, (kind, d, name, result[name])


def test_blocked_neighbour_search_equals_brute_force_and_drops_duplicates():
    points = manifold("sphere", 3, 300, seed=7).float() * 10 + 3  # off-centre: the search centres the data
    exact = torch.cdist(points.double(), points.double())
    exact.fill_diagonal_(float("inf"))
    expected = exact.topk(6, largest=False).values
    assert torch.allclose(ev.knn_distances(points, 6, block_size=37), expected, rtol=1e-6)
    rows = torch.tensor([5, 100, 299])
    assert torch.allclose(ev.knn_distances(points, 6, rows=rows, block_size=64), expected[rows], rtol=1e-6)
    with_copies = torch.cat([points, points[:20]])
    a, b = ev.intrinsic_dimension(points, k=6), ev.intrinsic_dimension(with_copies, k=6)
    assert b["duplicates"] == 20 and b["num_points"] == 300
    assert a["mle"] == pytest.approx(b["mle"], rel=1e-9) and a["twonn"] == pytest.approx(b["twonn"], rel=1e-9)


# ----------------------------------------------------------------------------- small pieces


def test_frechet_distance_from_features_equals_the_covariance_form():
    rng = np.random.default_rng(8)
    full = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)), rng.normal(1.0, 2.0, size=(150, 16))
    few = rng.normal(size=(20, 64)), rng.normal(1.0, 2.0, size=(13, 64))  # rank-deficient, as recon's small runs
    for (f1, f2), rel in ((full, 1e-9), (few, 1e-6)):
        expected = ev.frechet_distance(*ev.compute_statistics(f1), *ev.compute_statistics(f2))
        assert ev.frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=rel)
        assert abs(ev.frechet_distance_from_features(f1, f1)) < 1e-9


def test_pytorch_fid_pipeline_matches_pytorch_fid(monkeypatch):
    """--protocol eqvae computes rFID with pytorch-fid's input path (x / 255, torch bilinear resize, 2x - 1)."""
    pfi = pytest.importorskip("pytorch_fid.inception")
    state = ev.random_inception_weights(0)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    images = torch.from_numpy(np.random.default_rng(9).integers(0, 256, size=(2, 48, 48, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = theirs(images.permute(0, 3, 1, 2).float() / 255)[0].flatten(1)
    model = ev.load_inception("random", "cpu")
    ours = ev.inception_features(model, images, pipeline="pytorch-fid")["pool"]
    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()
    adm = ev.inception_features(model, images)["pool"]
    assert (adm - expected).abs().max() > 1e-3 * expected.abs().max()  # the two pipelines differ


def test_eqvae_protocol_images_are_torchvision_resize_and_center_crop(tmp_path):
    from torchvision import transforms

    rng = np.random.default_rng(10)
    for i, (w, h) in enumerate([(50, 37), (30, 61)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    official = transforms.Compose([transforms.ToTensor(), transforms.Resize(32, antialias=True), transforms.CenterCrop(32),
                                   transforms.Normalize([0.5] * 3, [0.5] * 3)])
    ds = ev.AEImages(str(tmp_path), 32, protocol="eqvae")
    for i in range(2):
        x, index = ds[i]
        assert index == i and x.shape == (3, 32, 32)
        assert torch.allclose(x, official(Image.open(tmp_path / f"{i}.png").convert("RGB")), atol=1e-5)


def test_posterior_samples_do_not_depend_on_the_batch():
    torch.manual_seed(1)
    ae = models.build_autoencoder(models.AE_configs["tiny"]).eval()
    x = dyadic_images(3, 32, 11)
    with torch.no_grad():
        together = ev.ae_encode(ae, x, seeds=[7, 8, 9])
        alone = torch.cat([ev.ae_encode(ae, x[i : i + 1], seeds=[7 + i]) for i in range(3)])
        mean = ev.ae_encode(ae, x)
    assert torch.allclose(together, alone, atol=1e-5) and not torch.allclose(together, mean, atol=1e-3)


def test_subset_is_seeded_and_sorted():
    a, b = ev.subset_indices(100, 10, seed=3), ev.subset_indices(100, 10, seed=3)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0) and len(a) == 10
    assert not np.array_equal(a, ev.subset_indices(100, 10, seed=4))
    assert np.array_equal(ev.subset_indices(5, None), np.arange(5)) and np.array_equal(ev.subset_indices(5, 9), np.arange(5))


def test_pca_rgb_is_in_range_and_reproducible():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    rgb = ev.pca_rgb(z)
    assert rgb.shape == (2, 3, 8, 8) and rgb.min() == 0 and rgb.max() == 1
    assert torch.allclose(ev.pca_rgb(2 * z + 5), rgb, atol=1e-5)  # centred and min-max normalised
    assert ev.pca_rgb(z[:, :2]).shape == (2, 3, 8, 8)  # fewer than 3 channels


# ----------------------------------------------------------------------------- the CLI, 1 and 2 processes


@pytest.fixture(scope="module")
def ae_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate_ae")
    for seed, (config, name) in enumerate([("tiny", "kl.pt"), ("tiny-vq", "vq.pt")]):
        torch.manual_seed(seed)
        models.save_autoencoder(models.build_autoencoder(models.AE_configs[config]), str(tmp / name))
    return tmp


AE_ARGS = ["--vae", "kl.pt", "--vae", "vq.pt", "--image-size", "64", "--preset", "tiny"]
RECON_ARGS = ["recon", *AE_ARGS, "--data-path", "builtin:shapes:5", "--num-images", "3", "--seed", "1",
              "--inception-weights", "random", "--lpips-random"]


@pytest.fixture(scope="module")
def recon_runs(ae_files):
    """recon with Figure 3's latent transforms in one process; the plain table on 2 processes."""
    single = run_cli(RECON_ARGS + ["--latent-transform", "--out", "single.json"], ae_files)
    assert single.returncode == 0, single.stderr
    multi = run_cli(RECON_ARGS + ["--out", "multi.json"], ae_files, nproc=2)
    assert multi.returncode == 0, multi.stderr
    return single, multi


def test_cli_recon_writes_the_table(recon_runs, ae_files):
    single, _ = recon_runs
    r = json.loads((ae_files / "single.json").read_text())
    assert r["command"] == "recon" and r["protocol"] == "ours" and r["num_images"] == 3 and r["world_size"] == 1
    assert r["comparable"] is False and r["inception_weights"] == "random" and r["lpips_backbone"] == "random"
    assert [row["vae"] for row in r["rows"]] == ["kl.pt", "vq.pt"] and [row["kind"] for row in r["rows"]] == ["kl", "vq"]
    for row in r["rows"]:
        assert row["rfid"] > 0 and 0 < row["psnr"] < 60 and -1 < row["ssim"] < 1 and row["lpips"] > 0
        latent = row["rfid_latent_transform"]
        assert set(latent) == {"scale_0.75", "scale_0.5", "scale_0.25", "rot_90", "rot_180", "rot_270", "rot_mean"}
        assert all(v > 0 for v in latent.values())
        assert latent["rot_mean"] == pytest.approx(np.mean([latent["rot_90"], latent["rot_180"], latent["rot_270"]]))
    for text in ("rFID s=0.25", "rFID rot", "kl.pt", "not comparable to anything", "random LPIPS"):
        assert text in single.stdout
    assert any("fewer than 2048" in n for n in r["notes"])


def test_cli_recon_on_two_processes_equals_one(recon_runs, ae_files):
    a, b = (json.loads((ae_files / f).read_text()) for f in ("single.json", "multi.json"))
    assert b["world_size"] == 2 and "rfid_latent_transform" not in b["rows"][0]
    for ra, rb in zip(a["rows"], b["rows"]):
        for key in ("rfid", "psnr", "ssim", "lpips"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4), key


def test_cli_recon_official_protocol(ae_files):
    r = run_cli(["recon", *AE_ARGS, "--data-path", "builtin:shapes:2", "--protocol", "eqvae", "--inception-weights", "random",
                 "--no-lpips", "--out", "eqvae.json"], ae_files)
    assert r.returncode == 0, r.stderr
    out = json.loads((ae_files / "eqvae.json").read_text())
    assert out["protocol"] == "eqvae" and out["fid_pipeline"] == "pytorch-fid" and "Resize" in out["crop"]
    assert out["lpips_backbone"] is None and all(row["lpips"] is None for row in out["rows"])
    assert all(np.isfinite(row["rfid"]) and np.isfinite(row["psnr"]) for row in out["rows"])
    assert any("VQ models reconstruct deterministically" in n for n in out["notes"])
    bad = run_cli(["recon", *AE_ARGS, "--data-path", "builtin:shapes:2", "--resize-antialias", "--inception-weights", "random"], ae_files)
    assert bad.returncode == 2 and "--protocol eqvae" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_equiv_one_and_two_processes_and_direct(ae_files):
    args = ["equiv", *AE_ARGS, "--data-path", "builtin:shapes:6"]
    single = run_cli(args + ["--out", "eq1.json"], ae_files)
    multi = run_cli(args + ["--out", "eq2.json"], ae_files, nproc=2)
    assert single.returncode == 0, single.stderr
    assert multi.returncode == 0, multi.stderr
    a, b = (json.loads((ae_files / f).read_text()) for f in ("eq1.json", "eq2.json"))
    assert a["scales"] == [0.25, 0.5, 0.75] and a["rotations"] == ["pi/2", "pi", "3pi/2"] and a["interp"] == "bicubic"
    assert "Delta rotation" in single.stdout
    x = torch.stack([ev.AEImages("builtin:shapes:6", 64)[i][0] for i in range(6)])
    for ra, rb, name in zip(a["rows"], b["rows"], ["kl.pt", "vq.pt"]):
        ae = models.load_autoencoder(str(ae_files / name)).eval()
        direct = ev.equivariance_errors(ae, x)
        for kind in ("rotation", "scale"):
            assert ra[f"eq_error_{kind}"] > 0
            assert ra[f"eq_error_{kind}"] == pytest.approx(rb[f"eq_error_{kind}"], rel=1e-5)
            assert ra[f"eq_error_{kind}"] == pytest.approx(float(direct[kind].mean()), rel=1e-5)


def test_cli_id_one_and_two_processes(ae_files):
    args = ["id", *AE_ARGS, "--data-path", "builtin:shapes:30", "--mle-k", "10", "--knn-block", "7"]
    single = run_cli(args + ["--out", "id1.json"], ae_files)
    multi = run_cli(args + ["--out", "id2.json"], ae_files, nproc=2)
    assert single.returncode == 0, single.stderr
    assert multi.returncode == 0, multi.stderr
    a, b = (json.loads((ae_files / f).read_text()) for f in ("id1.json", "id2.json"))
    assert a["mle_k"] == 10 and [r["latent_dim"] for r in a["rows"]] == [4 * 16 * 16, 16 * 16 * 16]
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["num_points"] == 30 and ra["mle"] > 0 and ra["twonn"] > 0
        assert ra["mle"] == pytest.approx(rb["mle"], rel=1e-4) and ra["twonn"] == pytest.approx(rb["twonn"], rel=1e-4)
    assert "ID TwoNN" in single.stdout
    too_few = run_cli(["id", *AE_ARGS, "--data-path", "builtin:shapes:5"], ae_files)
    assert too_few.returncode == 2 and "--mle-k 20" in too_few.stderr


def test_cli_figures_writes_pngs(ae_files):
    r = run_cli(["figures", *AE_ARGS, "--data-path", "builtin:shapes:20", "--num-images", "3", "--out", "figs"], ae_files)
    assert r.returncode == 0, r.stderr
    info = json.loads((ae_files / "figs" / "figures.json").read_text())
    assert len(info["image_indices"]) == 3
    expected_columns = {"figure1_latent_pca.png": 3, "figure2_scale0.5.png": 6, "figure2_rotation90.png": 6}
    assert set(info["figures"]) == set(expected_columns)
    for name, cols in expected_columns.items():
        assert len(info["figures"][name]["columns"]) == cols
        with Image.open(ae_files / "figs" / name) as img:
            img.load()
            # 64 px cells enlarged to 128, 2 px padding; a text header above the grid
            assert img.mode == "RGB" and img.width == cols * 130 + 2 and img.height > 3 * 130 + 2


def test_cli_id_counts_a_duplicated_image_once_whatever_the_batching(ae_files):
    """Two of nine images are copies. Encoded in batches of other sizes their latents differ in the
    last bits, which an exact comparison misses (a 1e-7 neighbour distance then wrecks both
    estimators): copies are found on the pixels, so batch size and process count change nothing.
    Seven distinct latents are enough for --mle-k 6 (k + 1 points); the estimate is flagged as not
    comparable with the paper's 50k images."""
    folder = ae_files / "with-copies"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for copy, original in ((7, 0), (8, 1)):
        shutil.copy(folder / f"{original}.png", folder / f"{copy}.png")
    args = ["id", "--vae", "kl.pt", "--image-size", "64", "--preset", "tiny", "--data-path", str(folder), "--mle-k", "6"]
    single = run_cli(args + ["--batch-size", "2", "--out", "copies1.json"], ae_files)
    multi = run_cli(args + ["--batch-size", "3", "--out", "copies2.json"], ae_files, nproc=2)
    assert single.returncode == 0, single.stderr
    assert multi.returncode == 0, multi.stderr
    a, b = (json.loads((ae_files / f).read_text()) for f in ("copies1.json", "copies2.json"))
    for r in (a, b):
        assert r["rows"][0]["num_points"] == 7 and r["rows"][0]["duplicate_images"] == 2
        assert r["comparable"] is False and any("fewer than 2048" in n for n in r["notes"])
    assert a["rows"][0]["mle"] == pytest.approx(b["rows"][0]["mle"], rel=1e-4)
    assert a["rows"][0]["twonn"] == pytest.approx(b["rows"][0]["twonn"], rel=1e-4)


def test_cli_figures_draws_tau_x_for_each_realised_scale(ae_files):
    """At 40 px an f4 latent is 10 wide (s = 0.5 gives 5, a 20 px tau x) and an f8 latent 5 wide
    (s = 0.5 rounds to 2, a 16 px tau x): the f8 model's columns get their own tau x; equiv records
    the scales each latent realises."""
    torch.manual_seed(0)
    config = dict(models.AE_configs["tiny"], ch_mult=[1, 2, 2, 2])
    models.save_autoencoder(models.build_autoencoder(config), str(ae_files / "kl8.pt"))
    common = ["--vae", "kl.pt", "--vae", "kl8.pt", "--image-size", "40", "--preset", "tiny", "--data-path", "builtin:shapes:4"]
    r = run_cli(["figures", *common, "--batch-size", "3", "--out", "figs40"], ae_files)
    assert r.returncode == 0, r.stderr
    columns = json.loads((ae_files / "figs40" / "figures.json").read_text())["figures"]["figure2_scale0.5.png"]["columns"]
    assert columns == ["x", "tau x", "kl.pt: D(E(tau x))", "kl.pt: D(tau E(x))", "tau x: 16 px, for kl8.pt",
                       "kl8.pt: D(E(tau x))", "kl8.pt: D(tau E(x))"]
    r = run_cli(["equiv", *common, "--out", "equiv40.json"], ae_files)
    assert r.returncode == 0, r.stderr
    rows = json.loads((ae_files / "equiv40.json").read_text())["rows"]
    assert [row["scales_realised"] for row in rows] == [[0.2, 0.5, 0.8], [0.2, 0.4, 0.8]]


def test_cli_broken_images_are_left_out_on_record_or_stop_the_run(ae_files):
    """A PNG whose structure check fails while the folder is listed is left out, and the JSON says so;
    a truncated JPEG passes that check and fails when read: the run stops naming it (skipping it
    there would count the next image twice)."""
    folder = ae_files / "broken"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, ext in enumerate(["png", "png", "png", "jpg"]):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.{ext}")
    for name in ("0.png", "3.jpg"):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    args = ["equiv", "--vae", "kl.pt", "--image-size", "64", "--preset", "tiny", "--data-path", str(folder)]
    r = run_cli(args + ["--out", "broken.json"], ae_files)
    assert r.returncode == 2 and "3.jpg cannot be read" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (folder / "3.jpg").unlink()
    r = run_cli(args + ["--out", "broken.json"], ae_files)
    assert r.returncode == 0, r.stderr
    result = json.loads((ae_files / "broken.json").read_text())
    assert result["num_images"] == 2 and any("1 unreadable image(s) left out" in n and "0.png" in n for n in result["notes"])


def test_cli_bad_input_stops_with_one_line(ae_files, monkeypatch, capsys):
    """An --out that is a folder and an image size SSIM cannot window are refused before any work."""
    monkeypatch.chdir(ae_files)
    monkeypatch.setenv("EQVAE_CACHE", str(ae_files / "cache"))
    folder = ae_files / "a-folder"
    folder.mkdir()
    cases = [(["equiv", *AE_ARGS, "--data-path", "builtin:shapes:2", "--out", str(folder)], "is a folder"),
             (["recon", *AE_ARGS, "--image-size", "8", "--data-path", "builtin:shapes:2", "--inception-weights", "random",
               "--lpips-random"], "SSIM's 11x11 window")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(ev.parse_args(argv))
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["id", "--vae", "scratch:tiny", "--data-path", "builtin:shapes:8", "--knn-block", "0"],
    ["equiv", "--vae", "scratch:tiny", "--data-path", "builtin:shapes:8", "--batch-size", "0"],
    ["equiv", "--vae", "scratch:tiny", "--data-path", "builtin:shapes:8", "--image-size", "0"],
    ["recon", "--vae", "scratch:tiny", "--data-path", "builtin:shapes:8", "--num-workers", "-1"],
])
def test_bad_counts_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args(argv)
    assert e.value.code == 2 and "or more" in capsys.readouterr().err
