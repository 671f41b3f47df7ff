"""Image folders (bad files, every mode), crops and the built-in procedural dataset."""
import collections
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data


def make_folder(root):
    """A class folder with one image per PIL mode we support, plus broken and non-image files."""
    rng = np.random.default_rng(0)
    a, b = root / "a_class", root / "b_class"
    a.mkdir(parents=True)
    b.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(a / "rgba.PNG")
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(a / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(b / "cmyk.JPEG")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("P").save(b / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(b / "sixteen.png")
    (a / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (b / "notes.txt").write_text("not an image")
    return root


def test_folder_loads_good_images_and_names_bad_ones(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match=r"(?s)skipping 1 unreadable image.*corrupt\.jpg"):
        ds = data.ImageFolderDataset(str(root), 32)
    assert len(ds) == 5 and ds.classes == ["a_class", "b_class"]
    labels = sorted(ds[i][1] for i in range(len(ds)))
    assert labels == [0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_flat_folder_is_one_class_and_recursive(tmp_path):
    root = make_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning):
        ds = data.ImageFolderDataset(str(root), 16, class_folders=False)
    assert ds.num_classes == 1 and len(ds) == 5


def test_empty_and_missing_folders_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(RuntimeError, match="no readable image found under .*empty"):
        data.make_dataset(str(tmp_path / "empty"), 32)
    with pytest.raises(FileNotFoundError, match="--data-path .*nowhere"):
        data.make_dataset(str(tmp_path / "nowhere"), 32)


def test_class_layout_hidden_folders_empty_classes_and_stray_images(tmp_path):
    """A hidden folder is no class (sorted first, it would shift every label); an empty class folder
    is refused, as torchvision's ImageFolder; images beside class folders are named as left out."""
    root = tmp_path / "imgs"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 10, 10)).save(root / name / "0.png")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (20, 20)).save(root / ".ipynb_checkpoints" / "old.png")
    ds = data.ImageFolderDataset(str(root), 16)
    assert ds.classes == ["cat", "dog"] and [label for _, label in ds.samples] == [0, 1]
    flat = tmp_path / "flat"
    (flat / ".ipynb_checkpoints").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(flat / "a.png")
    Image.new("RGB", (20, 20)).save(flat / ".ipynb_checkpoints" / "a-checkpoint.png")
    ds = data.ImageFolderDataset(str(flat), 16)  # a hidden folder makes no class layout, and adds no image
    assert ds.classes == ["all"] and [os.path.basename(p) for p, _ in ds.samples] == ["a.png"]
    Image.new("RGB", (20, 20)).save(root / "stray.png")
    with pytest.warns(UserWarning, match=r"1 image\(s\) beside them \(e.g. stray.png\)"):
        data.ImageFolderDataset(str(root), 16)
    (root / "empty_class").mkdir()
    with pytest.raises(RuntimeError, match="without images: empty_class"):
        data.ImageFolderDataset(str(root), 16)


def test_cache_builds_stop_at_a_truncated_image_instead_of_substituting(tmp_path):
    """A JPEG cut short passes the header check; training skips it for the next image, but a cache
    build (skip_broken=False), whose labels are fixed up front, stops and names it."""
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "a" / "0.jpg")
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "1.jpg").write_bytes(good[: len(good) // 2])
    assert len(data.make_dataset(str(root), 32)) == 2  # the header check keeps it
    with pytest.warns(UserWarning, match="skipping unreadable image .*1.jpg"):
        data.make_dataset(str(root), 32)[1]
    strict = data.make_dataset(str(root), 32, skip_broken=False)
    with pytest.raises(RuntimeError, match=r"1\.jpg cannot be read .*replace it"):
        strict[1]


def test_cache_datasets_keep_a_bounded_number_of_shards_open(monkeypatch):
    """cached_shard opens each shard once while it is in use and drops the least recently used one
    beyond OPEN_SHARDS, so a shuffled epoch over thousands of shards holds few files."""
    monkeypatch.setattr(data, "OPEN_SHARDS", 2)
    opened, shards = [], collections.OrderedDict()
    for k in (0, 1, 0, 2, 0, 1):
        assert data.cached_shard(shards, k, lambda k: opened.append(k) or f"shard {k}") == f"shard {k}"
        assert len(shards) <= 2
    assert opened == [0, 1, 2, 1]  # 0 stayed open (recently used), 1 was dropped for 2 and reopened


def test_mode_conversions():
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert np.asarray(data.to_rgb(sixteen))[0, :, 0].tolist() == [0, 128, 255]
    transparent = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(data.to_rgb(transparent)).reshape(-1, 3).tolist() == [[255, 255, 255]] * 4
    assert data.to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"


def test_adm_center_crop():
    """Box halving while at least twice the target, bicubic to the target, central square."""
    arr = np.zeros((300, 1000, 3), dtype=np.uint8)
    arr[140:160, 490:510] = 255  # a marker at the centre
    out = np.asarray(data.center_crop_arr(Image.fromarray(arr), 64))
    assert out.shape == (64, 64, 3)
    ys, xs = np.nonzero(out[..., 0] > 128)
    assert abs(ys.mean() - 31.5) < 1.5 and abs(xs.mean() - 31.5) < 1.5
    # an image exactly twice the target is box-halved, then needs no further resize
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(data.center_crop_arr(big, 64)), np.asarray(big.resize((64, 64), Image.BOX)))


def test_random_crop_and_flip_shapes():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    crop = data.random_crop_arr(img, 64)
    assert crop.size == (64, 64)
    x = data.preprocess(img, 48, crop="random", flip=True)
    assert x.shape == (3, 48, 48)


def test_random_crop_zooms_by_up_to_one_over_min_crop_frac():
    """The official crop: a square of side min_side x U(frac, 1) resized to the target. On a
    horizontal ramp (pixel value = column) the output's value span measures the crop side."""
    ramp = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (160, 200, 3)).copy()
    img, rng = Image.fromarray(ramp), random.Random(0)
    spans = [int(np.ptp(np.asarray(data.random_crop_arr(img, 64, rng, 0.5))[..., 0])) + 1 for _ in range(200)]
    assert 80 - 3 <= min(spans) < 90 and 150 < max(spans) <= 160  # sides from 80 (= 0.5 x 160) to 160
    whole = data.random_crop_arr(Image.fromarray(ramp[:, :160]), 64, random.Random(0), 1.0)
    assert np.array_equal(np.asarray(whole), np.asarray(Image.fromarray(ramp[:, :160]).resize((64, 64), Image.BOX)))
    small = data.random_crop_arr(Image.fromarray(ramp[:30, :40]), 64, random.Random(0), 0.5)
    assert small.size == (64, 64)  # smaller than the target: enlarged, as the official pipeline does


def test_builtin_shapes_is_deterministic():
    a = data.make_dataset("builtin:shapes:20:3", 32)
    b = data.make_dataset("builtin:shapes:20:3", 32)
    c = data.make_dataset("builtin:shapes:20:4", 32)
    assert len(a) == 20 and a.num_classes == 10
    assert all(torch.equal(a[i][0], b[i][0]) for i in range(5))
    assert not torch.equal(a[0][0], c[0][0])
    assert [a[i][1] for i in range(20)] == [i % 10 for i in range(20)]
    assert data.make_dataset("builtin:shapes", 24)[7][0].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="builtin:shapes"):
        data.make_dataset("builtin:circles", 32)


def test_plain_shapes_are_centred_on_a_flat_background():
    """builtin:shapes-plain: image i has the class and shape colour of builtin:shapes' image i,
    centred on one flat colour."""
    textured = data.make_dataset("builtin:shapes:10:0", 64)
    plain = data.make_dataset("builtin:shapes-plain:10:0", 64)
    for i in range(10):
        (x, y), (p, q) = textured[i], plain[i]
        assert y == q == i % 10
        corner = p[:, :4, :4].reshape(3, -1)
        assert (corner - corner[:, :1]).abs().max() < 1e-6
        shape = (p - p[:, :1, :1]).abs().amax(0) > 0.5  # where it differs from its background
        rows, cols = torch.nonzero(shape, as_tuple=True)
        assert shape.sum() > 20 and abs(rows.float().mean() - 31.5) < 8 and abs(cols.float().mean() - 31.5) < 8
        # the same shape colour: the plain shape's median colour appears in the textured image
        colour = p[:, shape].median(dim=1).values
        assert (x - colour.view(3, 1, 1)).abs().amax(0).min() < 0.05
    assert not torch.equal(textured[0][0], plain[0][0])


def test_upright_shapes_keep_one_outline_per_class():
    """builtin:shapes-upright: image i has builtin:shapes-plain's image i colours; every image of a
    class has the same coverage map (only colours vary), where the plain set rotates the shape. A
    triangle points up: its coverage is wider at the bottom of the image than at the top."""
    plain = data.make_dataset("builtin:shapes-plain:30:0", 64)
    upright = data.make_dataset("builtin:shapes-upright:30:0", 64)

    def coverage(x):  # x = background + alpha (colour - background) in each channel: alpha in [0, 1]
        diff = (x - x[:, :1, :1]).abs().sum(0)
        return diff / diff.max()

    for i in range(10):
        (p, y), (u, v) = plain[i], upright[i]
        assert y == v == i % 10
        assert torch.equal(p[:, 0, 0], u[:, 0, 0]) and torch.equal(p.flatten(1).amax(1), u.flatten(1).amax(1))
        maps = [coverage(upright[i + 10 * k][0]) for k in range(3)]
        assert all((m - maps[0]).abs().mean() < 0.02 for m in maps[1:]), data.SHAPE_CLASSES[i]
    squares = [coverage(plain[1 + 10 * k][0]) for k in range(3)]
    assert all((m - squares[0]).abs().mean() > 0.05 for m in squares[1:])  # the plain set rotates them
    triangle = coverage(upright[2][0]).sum(1)
    rows = torch.nonzero(triangle > 0.5).flatten()
    assert triangle[rows[-1] - 2] > 3 * triangle[rows[0] + 2]


def test_epoch_indices_shard_one_permutation():
    shards = [data.epoch_indices(103, epoch=2, seed=5, rank=r, world_size=4) for r in range(4)]
    assert all(len(s) == 25 for s in shards)  # 103 - 3 dropped, 25 each
    merged = sorted(i for s in shards for i in s)
    assert len(set(merged)) == 100 and set(merged) <= set(range(103))
    assert data.epoch_indices(103, 2, 5, 1, 4) == shards[1]  # deterministic
    assert data.epoch_indices(103, 3, 5, 1, 4) != shards[1]  # a new order each epoch
    assert data.epoch_indices(10, 0, 0, shuffle=False) == list(range(10))


def test_step_batches_run_epoch_after_epoch_and_a_resume_reads_the_rest():
    items = torch.utils.data.TensorDataset(torch.arange(10))
    # 10 items, 3 a step: 3 steps an epoch (one item dropped), each epoch its own permutation
    plan = [np.array(data.epoch_indices(10, epoch, seed=5))[:9].reshape(3, 3) for epoch in range(3)]
    expected = [list(map(int, batch)) for epoch in plan for batch in epoch][:7]
    run = [batch[0].tolist() for batch in data.step_batches(items, 0, 7, 3, 3, seed=5)]
    assert run == expected and len({tuple(sorted(b)) for b in run[:3]}) == 3
    resumed = [batch[0].tolist() for batch in data.step_batches(items, 4, 7, 3, 3, seed=5)]
    assert resumed == expected[4:]
    assert list(data.step_batches(items, 7, 7, 3, 3, seed=5)) == []


def test_random_crops_depend_only_on_seed_epoch_index(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    ds = data.ImageFolderDataset(str(tmp_path), 32, crop="random", flip=True, class_folders=False, seed=1)
    first = ds[0][0]
    assert torch.equal(first, ds[0][0])  # same epoch: same crop, whatever else drew random numbers
    crops = set()
    for epoch in range(8):
        ds.epoch = epoch
        crops.add(ds[0][0].sum().item())
    assert len(crops) > 1
