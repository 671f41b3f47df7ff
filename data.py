"""Image datasets and preprocessing.

Rooms: image reading (any mode -> RGB), crops (ADM center crop, LDM training crop),
folder datasets (class folders and flat/recursive folders, bad files skipped and named),
the built-in procedural dataset `builtin:shapes`, and `make_dataset` that picks one from a path;
the caches: the machinery they share (and the autoencoder a cache was made with), the latent cache
(DiT/SiT), the token cache (MaskGIT).
"""
import collections
import hashlib
import json
import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import models
import utils

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

# ----------------------------------------------------------------------------- reading


def to_rgb(img):
    """Any PIL mode to 8-bit RGB: 16/32-bit integer images are rescaled (not clipped), alpha is
    composited on white (a transparent background is not black in the source), CMYK/P/L converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if arr.max() > 255 or img.mode.startswith("I;16") else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12) * 255.0
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_rgb(path):
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


# ----------------------------------------------------------------------------- crops


def center_crop_arr(pil_image, image_size):
    """ADM / DiT center crop: halve with a box filter while the short side is at least twice the
    target, bicubic-resize the short side to the target, then take the central square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def random_crop_arr(pil_image, image_size, rng=random, min_crop_frac=1.0):
    """LDM / official EQ-VAE training crop: a random square of side min_side x U(min_crop_frac, 1),
    resized to the target. min_crop_frac < 1 zooms in by up to 1 / min_crop_frac (official: 0.5);
    1 keeps the whole short side (resize the short side, then a random square). Shrinking uses area
    averaging (the official cv2.INTER_AREA); a crop smaller than the target is enlarged bicubically."""
    w, h = pil_image.size
    side = max(1, int(min(w, h) * rng.uniform(min_crop_frac, 1.0)))
    left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    pil_image = pil_image.crop((left, top, left + side, top + side))
    return pil_image.resize((image_size, image_size), resample=Image.BOX if side >= image_size else Image.BICUBIC)


def pil_to_tensor(pil_image):
    """uint8 HWC PIL -> float CHW in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(pil_image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


def preprocess(pil_image, image_size, crop="adm", flip=False, rng=random, min_crop_frac=1.0):
    """One image through the chosen crop (+ optional horizontal flip) to a [-1, 1] tensor."""
    if crop == "adm":
        pil_image = center_crop_arr(pil_image, image_size)
    elif crop == "random":
        pil_image = random_crop_arr(pil_image, image_size, rng, min_crop_frac)
    elif crop != "none":
        raise ValueError(f"unknown crop {crop!r}: use adm, random or none")
    if flip and rng.random() < 0.5:
        pil_image = pil_image.transpose(Image.FLIP_LEFT_RIGHT)
    return pil_to_tensor(pil_image)


def augment_rng(seed, epoch, index):
    """Random crops/flips drawn from (seed, epoch, index) alone, so they are the same with any
    number of workers or ranks, and after --resume."""
    return random.Random(f"{seed}-{epoch}-{index}")


def epoch_indices(num_items, epoch, seed, rank=0, world_size=1, shuffle=True):
    """This rank's sample order for an epoch: one seeded permutation, the tail dropped so every
    rank gets the same count, then every world_size-th item. A list is a valid DataLoader sampler;
    slicing it resumes mid-epoch."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_items, generator=g).tolist()
    else:
        order = list(range(num_items))
    usable = num_items - num_items % world_size
    return order[rank:usable:world_size]


def epoch_loader(dataset, step, steps_per_epoch, per_rank, seed, rank=0, world_size=1, num_workers=0, pin_memory=False):
    """The DataLoader for the rest of the epoch that `step` falls in: this rank's share of
    epoch_indices from the step's offset on (train_vae counts micro-batches here: step and
    steps_per_epoch times --grad-accum), and dataset.epoch set so the per-item flips and crops
    follow the epoch. The loader gets its own generator: otherwise it draws its base seed from the
    global RNG, and a resumed run, which makes one more loader, would leave the uninterrupted run's
    RNG stream."""
    epoch, offset = divmod(step, steps_per_epoch)
    dataset.epoch = epoch
    order = epoch_indices(len(dataset), epoch, seed, rank, world_size)[offset * per_rank: steps_per_epoch * per_rank]
    return torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=order, num_workers=num_workers,
                                       pin_memory=pin_memory, drop_last=True, generator=torch.Generator().manual_seed(seed + epoch))


def step_batches(dataset, step, max_steps, steps_per_epoch, per_rank, seed, rank=0, world_size=1, num_workers=0,
                 pin_memory=False):
    """This rank's batches for steps `step` to max_steps - 1, epoch after epoch, each epoch's
    epoch_loader starting at the step it is entered at (so a resumed run reads what the uninterrupted
    one would)."""
    while step < max_steps:
        for batch in epoch_loader(dataset, step, steps_per_epoch, per_rank, seed, rank, world_size, num_workers,
                                  pin_memory):
            if step >= max_steps:
                return
            yield batch
            step += 1


# ----------------------------------------------------------------------------- folders


def list_images(root):
    """All image files under root (recursive, extensions case-insensitive, hidden folders such as
    .ipynb_checkpoints left out), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return found


def _scan(path):
    """(problem or None, (width, height)) from the file's header and structure."""
    try:
        with Image.open(path) as img:
            size = img.size
            img.verify()  # structure check; truncated pixel data is caught again at load time
        return None, size
    except Exception as e:
        return f"{path} ({type(e).__name__}: {e})", (0, 0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under a folder. `class_folders=True`: ImageNet layout, label = index of the sorted
    top-level folder name; otherwise every image is label 0 (OpenImages-style flat/recursive).

    Hidden folders (a leading dot, such as .ipynb_checkpoints) are no classes: one sorted first
    would shift every label. Unreadable files are found once at construction and skipped with one
    warning naming each file (`check=True`, one header read per file); a file that breaks later
    (truncated data) is named and replaced by the next readable image, or, with
    `skip_broken=False` (cache builds, whose labels are fixed up front), stops the run. `min_size`
    lists the images whose short side is below it in `self.small` (the crops enlarge them; the
    trainer says so once); `self.sizes` holds each image's (width, height).
    """

    def __init__(self, root, image_size, crop="adm", flip=False, class_folders=True, min_size=None, check=True, seed=0,
                 min_crop_frac=1.0, skip_broken=True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data-path {root} is not a folder: give a folder of images (or builtin:shapes)")
        self.root, self.image_size, self.crop, self.flip = root, image_size, crop, flip
        self.min_crop_frac, self.small, self.skip_broken, self.skipped = min_crop_frac, [], skip_broken, []
        self.sizes = []  # (width, height) of each image, read while checking the folder
        subdirs = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")) if class_folders else []
        if subdirs:
            self.classes = subdirs
            self.samples = [(p, i) for i, d in enumerate(subdirs) for p in list_images(os.path.join(root, d))]
            present = {label for _, label in self.samples}  # one pass: ImageNet has 1.28M images
            empty = [d for i, d in enumerate(subdirs) if i not in present]
            if empty:  # as torchvision's ImageFolder: a class without images is a mistake in the layout
                raise RuntimeError(f"--data-path {root}: class folder(s) without images: {', '.join(empty[:5])}"
                                   f"{' ...' if len(empty) > 5 else ''}; remove them or add their images")
            stray = [f for f in sorted(os.listdir(root)) if f.lower().endswith(IMG_EXTENSIONS)]
            if stray:
                warnings.warn(f"--data-path {root} has class folders and {len(stray)} image(s) beside them "
                              f"(e.g. {stray[0]}), which belong to no class: they are left out", stacklevel=2)
        else:
            self.classes = ["all"]
            self.samples = [(p, 0) for p in list_images(root)]
        if check and self.samples:
            with ThreadPoolExecutor(8) as pool:
                scans = list(pool.map(_scan, [p for p, _ in self.samples]))
            problems = self.skipped = [problem for problem, _ in scans if problem]
            if problems:
                warnings.warn(
                    f"skipping {len(problems)} unreadable image(s) under {root}:\n  " + "\n  ".join(problems), stacklevel=2
                )
            if min_size is not None:
                self.small = [p for (p, _), (problem, size) in zip(self.samples, scans) if not problem and min(size) < min_size]
            self.sizes = [size for problem, size in scans if not problem]
            self.samples = [s for s, (problem, _) in zip(self.samples, scans) if not problem]
        if not self.samples:
            raise RuntimeError(f"no readable image found under {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
        self.num_classes = len(self.classes)
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = load_rgb(path)
            except Exception as e:
                if not self.skip_broken:
                    raise RuntimeError(f"{path} cannot be read ({type(e).__name__}: {e}): replace it with a readable "
                                       f"image, or move it out of --data-path and build into a new folder") from None
                warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})", stacklevel=2)
                continue
            rng = augment_rng(self.seed, self.epoch, index)
            return preprocess(image, self.image_size, self.crop, self.flip, rng, self.min_crop_frac), label
        raise RuntimeError(f"no readable image left under {self.root}")


# ----------------------------------------------------------------------------- builtin:shapes

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent", "arrow")


def _polygon(cx, cy, r, n, angle, inner=None):
    pts = []
    for i in range(n * (2 if inner else 1)):
        radius = r if (inner is None or i % 2 == 0) else r * inner
        a = angle + i * math.pi / (n if inner else n / 2)
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


# builtin:shapes-upright: each class in one orientation (square axis-aligned, triangle and star
# pointing up, plus-shaped cross, tall diamond, arrow pointing right)
UPRIGHT_ANGLES = {"square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2, "hexagon": -math.pi / 2,
                  "diamond": math.pi / 2}


def render_shape(index, image_size, seed=0, variant="shapes"):
    """Deterministic image `index` of the procedural dataset: (PIL RGB, label).

    A shape of class `index % 10`, random colour, size, rotation and position, on a textured
    background (colour gradient + stripes or checkers + noise). `variant` is a BUILTIN_DATASETS
    name: "shapes-plain" draws the same class, colour and rotation (every random draw is kept),
    centred at one size on a flat background of the gradient's mean colour: an easier set, where the
    class decides most of the image; "shapes-upright" also fixes each class's rotation, leaving colour
    as the only variation. Drawn at 4x and box-downsampled so edges are anti-aliased at any resolution.
    """
    plain = variant != "shapes"
    rng = random.Random(seed * 1_000_003 + index)
    label = index % len(SHAPE_CLASSES)
    S = image_size * 4
    # textured background
    c0 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    ga = rng.uniform(0, 2 * math.pi)
    g = (np.cos(ga) * xx + np.sin(ga) * yy + 1) / 2
    bg = c0 * (1 - g[..., None]) + c1 * g[..., None]
    period = rng.uniform(0.08, 0.3)
    if rng.random() < 0.5:
        pa = rng.uniform(0, math.pi)
        pattern = np.sin(2 * math.pi * (np.cos(pa) * xx + np.sin(pa) * yy) / period)
    else:
        pattern = np.sign(np.sin(2 * math.pi * xx / period) * np.sin(2 * math.pi * yy / period))
    bg += rng.uniform(10, 40) * pattern[..., None]
    noise = np.random.default_rng(seed * 7919 + index).normal(0, rng.uniform(2, 10), (S // 4, S // 4, 1))
    bg += np.kron(noise, np.ones((4, 4, 1)))
    if plain:
        bg = np.broadcast_to((c0 + c1) / 2, bg.shape)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    # the shape: colour far from the background mean so it stays visible
    color = tuple(int(255 - v + rng.randint(-40, 40)) % 256 for v in ((c0 + c1) / 2))
    r = rng.uniform(0.18, 0.38) * S
    cx, cy = rng.uniform(r, S - r), rng.uniform(r, S - r)
    angle = rng.uniform(0, 2 * math.pi)
    if plain:
        r, cx, cy = 0.32 * S, S / 2, S / 2
    name = SHAPE_CLASSES[label]
    if variant == "shapes-upright":
        angle = UPRIGHT_ANGLES.get(name, 0.0)
    if name == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif name == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=int(r * 0.3))
    elif name == "square":
        draw.polygon(_polygon(cx, cy, r, 4, angle), fill=color)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, angle), fill=color)
    elif name == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=color)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, r, 5, angle, inner=0.45), fill=color)
    elif name == "diamond":
        pts = [(cx + r, cy), (cx, cy + 0.55 * r), (cx - r, cy), (cx, cy - 0.55 * r)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=color)
    elif name == "cross":
        w = 0.3 * r
        for pts in ([(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
                    [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]):
            draw.polygon(_rotate(pts, cx, cy, angle), fill=color)
    elif name == "crescent":
        mask = Image.new("L", img.size, 0)
        md = ImageDraw.Draw(mask)
        md.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        md.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=0)
        img.paste(Image.new("RGB", img.size, color), (0, 0), mask)
    elif name == "arrow":
        w = 0.18 * r
        pts = [(cx - r, cy - w), (cx + 0.2 * r, cy - w), (cx + 0.2 * r, cy - 2.5 * w), (cx + r, cy),
               (cx + 0.2 * r, cy + 2.5 * w), (cx + 0.2 * r, cy + w), (cx - r, cy + w)]
        draw.polygon(_rotate(pts, cx, cy, angle), fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.5)).resize((image_size, image_size), Image.BOX)
    return img, label


class ShapesDataset(torch.utils.data.Dataset):
    """`builtin:shapes[:N[:SEED]]`: N procedural images (default 10000) of 10 shape classes,
    identical for a seed on every machine; nothing to download. `builtin:shapes-plain` draws the
    same classes, colours and rotations centred on flat backgrounds (an easier set for the CPU demos);
    `builtin:shapes-upright` draws those upright, one orientation per class (the DiT demo's set)."""

    classes = SHAPE_CLASSES
    num_classes = len(SHAPE_CLASSES)

    def __init__(self, num_images, image_size, seed=0, flip=False, variant="shapes", augment_seed=0):
        self.num_images, self.image_size, self.seed, self.flip, self.variant = num_images, image_size, seed, flip, variant
        self.augment_seed = augment_seed  # the flips' seed (--global-seed); `seed` draws the images
        self.epoch = 0

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        img, label = render_shape(index, self.image_size, self.seed, self.variant)
        if self.flip and augment_rng(self.augment_seed, self.epoch, index).random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img), label


BUILTIN_DATASETS = ("shapes", "shapes-plain", "shapes-upright")


def parse_builtin(spec):
    """'builtin:NAME', 'builtin:NAME:N' or 'builtin:NAME:N:SEED' -> (NAME, N, seed), NAME in
    BUILTIN_DATASETS."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != "builtin" or parts[1] not in BUILTIN_DATASETS or len(parts) > 4:
        raise ValueError(f"unknown built-in dataset {spec!r}: use builtin:NAME[:N[:SEED]] with NAME one of "
                         f"{', '.join(BUILTIN_DATASETS)} (e.g. builtin:shapes:10000)")
    try:
        n = int(parts[2]) if len(parts) > 2 else 10000
        seed = int(parts[3]) if len(parts) > 3 else 0
    except ValueError:
        raise ValueError(f"{spec!r}: N and SEED in builtin:{parts[1]}:N:SEED must be integers") from None
    if n < 1:
        raise ValueError(f"{spec!r}: N, the number of images, must be 1 or more")
    return parts[1], n, seed


def make_dataset(data_path, image_size, crop="adm", flip=False, class_folders=True, min_size=None, seed=0, min_crop_frac=1.0,
                 skip_broken=True):
    """A folder path or `builtin:shapes...` -> a dataset yielding ([-1, 1] CHW tensor, label).

    `seed` seeds the augmentations (crops, flips); set `dataset.epoch` before each epoch."""
    if data_path.startswith("builtin:"):
        name, n, shape_seed = parse_builtin(data_path)
        return ShapesDataset(n, image_size, seed=shape_seed, flip=flip, variant=name, augment_seed=seed)
    return ImageFolderDataset(data_path, image_size, crop=crop, flip=flip, class_folders=class_folders,
                              min_size=min_size, seed=seed, min_crop_frac=min_crop_frac, skip_broken=skip_broken)


def data_source(data_path):
    """What a cache records of where its images came from: the full builtin spec, or the folder's
    real path (so ./imagenet and /data/imagenet are the same source)."""
    if data_path.startswith("builtin:"):
        name, n, seed = parse_builtin(data_path)
        return f"builtin:{name}:{n}:{seed}"
    return os.path.realpath(data_path)


# ----------------------------------------------------------------------------- caches (shared machinery, latents)

CACHE_FORMAT = "eqvae-latent-cache-1"
TOKEN_CACHE_FORMAT = "eqvae-token-cache-1"


def weights_hash(model):
    """A short content hash of a model's weights (names, shapes and bytes), to tell caches apart."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def coder_of(recorded, spec=None, trust_checkpoint=False, check_hash=True):
    """The autoencoder of a cache (`recorded`: its meta, or a model's recipe, with keys vae and
    vae_hash), loaded from `spec` (default: the recorded one); with check_hash, refused unless its
    weights are the recorded ones, since other weights decode the stored codes into noise.
    ValueError says which spec failed and why."""
    spec = spec or recorded["vae"]
    try:
        ae = models.load_autoencoder(spec, trust_checkpoint)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{spec} failed to load: {str(e).strip(chr(34) + chr(39))}") from None
    if check_hash and recorded.get("vae_hash") and weights_hash(ae) != recorded["vae_hash"]:
        raise ValueError(f"{spec} is not the autoencoder the codes were made with (weights hash differs)")
    return ae.eval()


def same_architecture_from_cache(ae, meta, trust_checkpoint=False):
    """A scratch: autoencoder drawn now, or, when the cache's saved one has the same architecture,
    that one: a scratch spec names an architecture, and its weights were drawn once, with the cache
    (another --global-seed would draw others and refuse a cache it made)."""
    try:
        saved = coder_of(meta, trust_checkpoint=trust_checkpoint)
    except ValueError:
        return ae
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    return saved if shapes(saved) == shapes(ae) else ae


def check_resumed_cache(recorded, meta, flag, folder):
    """--resume on the cache `folder` (--latents/--tokens): it must hold the codes of the run's
    autoencoder (weights hash) and of its images (source and count), as `recorded` in the run's
    recipe; a moved cache is fine. Other images would change the data order and the statistics.
    Returns the failure message, or None."""
    what = "latents" if flag == "latents" else "tokens"
    if recorded.get("vae_hash") not in (None, meta["vae_hash"]):
        return (f"--{flag} {folder} holds the {what} of another autoencoder than the resumed run's (weights hash "
                f"{meta['vae_hash']}, the run's {recorded['vae_hash']}): pass the run's cache")
    changed = [k for k in ("data", "count") if recorded.get(k) is not None and recorded[k] != meta.get(k)]
    if changed:
        return (f"--{flag} {folder} holds other images than the resumed run's cache ("
                + "; ".join(f"{k}: {meta.get(k)} here, {recorded[k]} in the run" for k in changed) + "): pass the run's cache")
    return None


def check_cache_flags(args, world_size, flag):
    """The cache trainers' first checks: a cache folder --`flag` (or --resume), a --data-path that
    exists, and a --global-batch-size that the processes share and a builtin: set can fill."""
    if getattr(args, flag) is None and args.resume is None:
        utils.fail(f"--{flag} is required: the {flag[:-1]} cache folder (built there from --data-path and --vae if empty)")
    if args.data_path and not args.data_path.startswith("builtin:") and not os.path.isdir(args.data_path):
        utils.fail(f"--data-path {args.data_path} does not exist or is not a folder")
    if args.global_batch_size <= 0 or args.global_batch_size % world_size:
        utils.fail(f"--global-batch-size {args.global_batch_size} must be positive and divisible by the {world_size} processes")
    if args.data_path and args.data_path.startswith("builtin:"):  # its size is known before any caching
        try:
            count = parse_builtin(args.data_path)[1]
        except ValueError as e:
            utils.fail(f"--data-path: {e}")
        if count < args.global_batch_size:
            utils.fail(f"--data-path {args.data_path} has {count} images, fewer than one --global-batch-size "
                       f"{args.global_batch_size}")


def cache_coder(args, flag, meta, device, coder, hint):
    """The trainers' autoencoder of --vae (`coder`: its name in messages) when the cache in --`flag`
    is to be built, or checked against it (--data-path given, or no complete cache there), loaded and
    checked against --image-size; None when an existing cache is only read. `hint`: which --vae the
    official runs cached."""
    folder, codes = getattr(args, flag), flag[:-1]
    if args.data_path is None and meta is not None:
        return None
    if args.data_path is None or args.vae is None:
        utils.fail((f"--{flag} {folder}, the resumed run's cache, holds no complete {codes} cache: pass "
                    f"--{flag} with the cache's place now" if args.resume else
                    f"--{flag} {folder} holds no complete {codes} cache: pass --data-path and --vae to build it")
                   if meta is None else f"--data-path needs --vae, the {coder} whose {flag} are cached ({hint})")
    try:
        ae = models.load_autoencoder(args.vae, args.trust_checkpoint).to(device).eval()
        if meta is not None and args.vae.startswith("scratch:"):  # the cache keeps the weights it drew
            ae = same_architecture_from_cache(ae, meta, args.trust_checkpoint).to(device)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        utils.fail(f"--vae {args.vae}: {str(e).strip(chr(34) + chr(39))}")
    return ae


def cache_plan(args, flag, meta, ae):
    """What --data-path encoded by `ae` would put in the cache --`flag`: its fingerprint, checked
    against the cache there when there is one (-> (fingerprint, None, None)), else against the folder
    (-> (fingerprint, the dataset to encode, the autoencoder spec the cache records)). A scratch:
    autoencoder is saved into the folder first: its codes could never be decoded otherwise."""
    folder = getattr(args, flag)
    try:
        fingerprint = dict(vae_hash=weights_hash(ae), image_size=args.image_size, crop="adm",
                           data=data_source(args.data_path))
        if meta is not None:
            check_cache_matches(meta, fingerprint, folder)
            return fingerprint, None, None
        check_build_plan(folder, fingerprint)  # before anything is written there
        dataset = make_dataset(args.data_path, args.image_size, crop="adm", min_size=None, skip_broken=False)
    except (OSError, ValueError, RuntimeError) as e:
        utils.fail(str(e))
    vae_spec = args.vae
    if vae_spec.startswith("scratch:"):
        vae_spec = os.path.join(folder, "autoencoder.pt")
        if utils.is_main():
            os.makedirs(folder, exist_ok=True)
            models.save_autoencoder(ae, vae_spec)
    return fingerprint, dataset, vae_spec


def grid_coder(args, meta, ae, device, coder):
    """The autoencoder that rank 0's sample grids decode with: `ae` when the cache step loaded it,
    else the cache's own, or --vae when given (a preset's scratch: spec would draw new weights).
    On the other ranks and without grids, `ae` as it is (None when the cache was only read)."""
    if args.sample_every <= 0 or ae is not None or not utils.is_main():
        return ae
    try:
        return coder_of(meta, args.vae if "vae" in args.cli_flags else None, args.trust_checkpoint).to(device)
    except ValueError as e:
        utils.fail(f"sample grids decode with the cache's {coder}: {e}; pass that {coder} as --vae, or --sample-every 0")


def dataset_labels(dataset):
    """(labels as int64 array, class names) without reading any pixel."""
    if isinstance(dataset, ShapesDataset):
        return np.arange(len(dataset)) % len(SHAPE_CLASSES), list(SHAPE_CLASSES)
    return np.array([label for _, label in dataset.samples], dtype=np.int64), list(dataset.classes)


def read_cache_meta(folder, fmt=CACHE_FORMAT):
    """meta.json of a complete cache of format `fmt` (latents: CACHE_FORMAT, tokens: TOKEN_CACHE_FORMAT), or None."""
    if os.path.exists(folder) and not os.path.isdir(folder):  # the first thing every cache user reads
        raise RuntimeError(f"{folder} is a file, not a cache folder: choose another folder")
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise RuntimeError(f"{path} is unreadable ({e}): delete it, then run again with the cache's --data-path and "
                           f"--vae to finish the cache") from None
    if meta.get("format") != fmt:
        what = "token cache" if fmt == TOKEN_CACHE_FORMAT else "latent cache"
        raise RuntimeError(f"{path} is not a {what} of this code ({meta.get('format')!r}): use another folder")
    own = os.path.join(os.path.abspath(folder), "autoencoder.pt")  # a scratch: model's weights, saved with the cache
    if os.path.basename(str(meta.get("vae"))) == "autoencoder.pt" and not os.path.isfile(meta["vae"]) and os.path.isfile(own):
        meta["vae"] = own  # the cache was moved: its weights moved with it
    return meta


def _shard_path(folder, k, kind="moments"):
    return os.path.join(folder, f"{kind}-{k:05d}.npy")


def to_uint8_images(x):
    """[-1, 1] images from pil_to_tensor -> the uint8 pixels they were made from (exact)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def check_cache_matches(meta, fingerprint, folder):
    """Refuse a cache (or a half-built one) made with another autoencoder, image size, crop or data."""
    # a key the cache does not record (data: caches built before it was recorded) is not compared
    diffs = [f"{k}: cache has {meta[k]!r}, this run {v!r}" for k, v in fingerprint.items() if k in meta and meta[k] != v]
    if diffs:
        raise RuntimeError(f"the cache {folder} was built differently, so it cannot be used for this run:\n  "
                           + "\n  ".join(diffs) + "\nchoose another cache folder (or delete this one to rebuild it)")


def check_build_plan(folder, fingerprint):
    """Before a build writes anything into `folder`: an interrupted (or repaired) build must be the
    same build as build.json's, and shards that no build.json explains are refused, not adopted."""
    build_path = os.path.join(folder, "build.json")
    if os.path.isfile(build_path):
        try:
            with open(build_path) as f:
                plan = json.load(f)
        except ValueError as e:
            raise RuntimeError(f"{build_path} is unreadable ({e}): delete {folder} and build again") from None
        check_cache_matches(plan, fingerprint, folder)
    elif os.path.isdir(folder) and any(f.endswith(".npy") and "-" in f for f in os.listdir(folder)):
        raise RuntimeError(f"{folder} holds cache shards but no build.json that says how they were made: "
                           f"delete the folder to build it again, or choose another")


def build_shards(folder, dataset, plan, resume_keys, encode, batch_size=32, num_workers=4, shard_images=1000,
                 desc="caching"):
    """What every cache build shares. Rank 0 records `plan` in build.json (kept after the build: an
    interrupted or repaired build must match it on `resume_keys`) and writes labels.npy; shards of
    `shard_images` images are split over the ranks, with a tqdm bar on rank 0. encode(x) -> {kind:
    array (B, ...)} for a [-1, 1] batch; each kind's shard is written atomically to KIND-NNNNN.npy
    in the order of plan["shard_kinds"], so the last kind's file marks a finished shard and a rerun
    resumes after it. Call on every rank."""
    n = len(dataset)
    num_shards = (n + shard_images - 1) // shard_images
    labels, _ = dataset_labels(dataset)
    build_path = os.path.join(folder, "build.json")
    # every rank checks, so that none is left waiting at the barrier for one that stopped
    check_build_plan(folder, {k: plan[k] for k in resume_keys})
    if utils.is_main():
        os.makedirs(folder, exist_ok=True)
        if not os.path.isfile(build_path):
            utils.write_json(build_path, plan)
        np.save(os.path.join(folder, "labels.npy"), labels)
    utils.barrier()
    rank, world = utils.rank_and_world()
    mine = range(rank, num_shards, world)
    for k in mine:  # a build stopped inside np.save leaves its temp file behind
        for kind in plan["shard_kinds"]:
            if os.path.exists(_shard_path(folder, k, kind) + ".tmp.npy"):
                os.remove(_shard_path(folder, k, kind) + ".tmp.npy")
    marker = plan["shard_kinds"][-1]
    todo = [k for k in mine if not os.path.isfile(_shard_path(folder, k, marker))]
    sizes = {k: min(n, (k + 1) * shard_images) - k * shard_images for k in mine}
    bar = tqdm(total=sum(sizes.values()), initial=sum(sizes.values()) - sum(sizes[k] for k in todo), unit="img",
               desc=f"{desc} (rank 0 of {world})" if world > 1 else desc, disable=not utils.is_main())
    for k in todo:
        indices = list(range(k * shard_images, min(n, (k + 1) * shard_images)))
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers)
        parts = {}
        for x, _ in loader:
            for kind, array in encode(x).items():
                parts.setdefault(kind, []).append(array)
            bar.update(x.shape[0])
        for kind in plan["shard_kinds"]:
            tmp = _shard_path(folder, k, kind) + ".tmp.npy"
            np.save(tmp, np.concatenate(parts[kind]))
            os.replace(tmp, _shard_path(folder, k, kind))
    bar.close()
    utils.barrier()


def finish_cache(folder, meta, fmt):
    """Rank 0 writes meta.json (its presence marks a complete cache); every rank then reads it back."""
    if utils.is_main():
        utils.write_json(os.path.join(folder, "meta.json"), meta)
    utils.barrier()
    return read_cache_meta(folder, fmt)


def complete_cache_meta(folder, fmt, flag):
    """meta.json of the complete cache in `folder`, or one error naming the flag (and saying when an
    interrupted build is there to finish)."""
    meta = read_cache_meta(folder, fmt)
    if meta is None:
        partial = " (an interrupted build: run again with --data-path and --vae to finish it)" \
            if os.path.isfile(os.path.join(folder, "build.json")) else ""
        what = "token cache" if fmt == TOKEN_CACHE_FORMAT else "latent cache"
        raise FileNotFoundError(f"{flag} {folder} holds no complete {what}{partial}")
    return meta


def open_shards(folder, meta, expected, what):
    """Check every shard of a complete cache when it is opened: expected {kind: (row shape, dtype)};
    a missing, truncated or mismatched shard is named with the fix."""
    n, per = meta["count"], meta["shard_images"]
    for k in range((n + per - 1) // per):
        rows = min(per, n - k * per)
        for kind, (shape, dtype) in expected.items():
            path = _shard_path(folder, k, kind)
            repair = (f"delete it and {folder}/meta.json, then run again with the cache's --data-path and --vae: "
                      f"the build re-encodes the missing shards")
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise RuntimeError(f"{what} shard {path} is missing or truncated ({e}): {repair}") from None
            if arr.shape != (rows, *shape) or arr.dtype != np.dtype(dtype):
                raise RuntimeError(f"{what} shard {path} holds {arr.shape} {arr.dtype}, expected {(rows, *shape)} "
                                   f"{np.dtype(dtype)}: {repair}")
    try:
        labels = np.load(os.path.join(folder, "labels.npy"))
    except (OSError, ValueError) as e:
        raise RuntimeError(f"{folder}/labels.npy is missing or unreadable ({e}): rebuild the cache") from None
    if len(labels) != n:
        raise RuntimeError(f"{folder}/labels.npy has {len(labels)} labels for {n} images: rebuild the cache")
    return labels


def build_latent_cache(folder, dataset, encode, fingerprint, latent_shape, info=None, batch_size=32, num_workers=4,
                       dtype="float16", device="cpu", shard_images=1000, store_images=False):
    """Encode every image of `dataset` (ADM center crop) and its horizontal flip into `folder`.

    encode(x) -> (mean, std) of the posterior for a [-1, 1] batch. `fingerprint` (weights hash,
    image size, crop) must match for the cache to be used; `info` is recorded alongside. Shards of
    `shard_images` images are split over the ranks and written atomically, so an interrupted build
    resumes where it stopped. Files: moments-NNNNN.npy (n, 2 [image, flip], 2 [mean, std], C, h, w), labels.npy,
    and meta.json last (its presence marks a complete cache), with the per-channel mean and std of
    z ~ q(z|x) over every stored latent. store_images also keeps the cropped images themselves,
    images-NNNNN.npy (n, 3, H, W) uint8, unflipped (REPA's encoder targets are computed from them).
    Call on every rank; returns the meta dict.
    """
    n = len(dataset)
    num_shards = (n + shard_images - 1) // shard_images
    _, class_names = dataset_labels(dataset)
    plan = dict(info or {}, **fingerprint, format=CACHE_FORMAT, count=n, latent_shape=list(latent_shape), dtype=dtype,
                shard_images=shard_images, images=bool(store_images),
                shard_kinds=["images", "moments"] if store_images else ["moments"],  # moments last: they mark a done shard
                num_classes=len(class_names), class_names=class_names)

    def encode_pairs(x):
        out = {"images": to_uint8_images(x).numpy()} if store_images else {}
        x = x.to(device)
        mean, std = encode(torch.cat([x, torch.flip(x, dims=[3])]))  # every image, then every flip
        mean, std = (m.float().cpu().numpy() for m in (mean, std))
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise RuntimeError("the autoencoder gave non-finite latents: check its weights (--vae)")
        largest = max(np.abs(mean).max(), std.max())
        if largest > np.finfo(dtype).max:  # float16 ends at 65504: stored as inf
            raise RuntimeError(f"latents beyond the range of the cache's {dtype} (largest {largest:.4g}): build with "
                               f"--cache-dtype float32 into a new folder")
        B = x.shape[0]
        out["moments"] = np.stack([np.stack([mean[:B], std[:B]], 1), np.stack([mean[B:], std[B:]], 1)], 1).astype(dtype)
        return out

    build_shards(folder, dataset, plan, (*fingerprint, "count", "dtype", "shard_images", "images"), encode_pairs,
                 batch_size, num_workers, shard_images, desc="caching latents")
    # per-channel statistics of z = mean + std * noise over all stored latents, exactly:
    # E[z] = E[mean], E[z^2] = E[mean^2] + E[std^2]; and of the mean alone (--no-latent-sample).
    # Each rank reads its share of the shards (ImageNet's cache is ~20 GB); the per-shard sums are
    # then added in shard order on every rank, so the numbers do not depend on the process count
    C = latent_shape[0]
    rank, world = utils.rank_and_world()
    per_shard = np.zeros((num_shards, 4, C))  # sum of mean, of mean^2, of std^2, and the element count
    for k in range(rank, num_shards, world):
        shard = np.load(_shard_path(folder, k), mmap_mode="r")
        m, s = shard[:, :, 0].astype(np.float64), shard[:, :, 1].astype(np.float64)
        per_shard[k, 0], per_shard[k, 1] = m.sum(axis=(0, 1, 3, 4)), (m ** 2).sum(axis=(0, 1, 3, 4))
        per_shard[k, 2], per_shard[k, 3] = (s ** 2).sum(axis=(0, 1, 3, 4)), m.size // C
    # every row is one rank's and zeros elsewhere, so the sum over ranks is exact
    per_shard = utils.global_sum(torch.from_numpy(per_shard).to(device))[0].cpu().numpy()
    totals = np.zeros((4, C))
    for shard_sums in per_shard:  # in shard order, whatever the process count
        totals = totals + shard_sums
    s1, s2, v2, count = totals
    mu = s1 / count
    meta = dict(plan, channel_mean=mu.tolist(), channel_std=np.sqrt(np.maximum((s2 + v2) / count - mu ** 2, 0)).tolist(),
                channel_std_of_mean=np.sqrt(np.maximum(s2 / count - mu ** 2, 0)).tolist())
    return finish_cache(folder, meta, CACHE_FORMAT)


OPEN_SHARDS = 16  # memory maps a cache dataset keeps open (per loader worker); each holds a file


def cached_shard(shards, k, open_shard):
    """shards[k] of the OrderedDict `shards`, opened by open_shard(k) on first use; beyond
    OPEN_SHARDS the least recently used map is dropped (and its file closed), since a shuffled
    epoch touches every shard: 1,282 for ImageNet, past a usual limit of 1,024 open files."""
    if k in shards:
        shards.move_to_end(k)
    else:
        shards[k] = open_shard(k)
        if len(shards) > OPEN_SHARDS:
            shards.popitem(last=False)
    return shards[k]


class LatentDataset(torch.utils.data.Dataset):
    """The cached posteriors: item i is ((2, C, h, w) [mean, std], label) of image i or of its flip,
    the flip drawn from (seed, epoch, i) like every other augmentation here (flip=False: never).
    images=True: ((2, C, h, w), (3, H, W) uint8 image flipped alike, label), from a cache built
    with store_images. Every shard is checked when the dataset is opened; a truncated or
    mismatched one is named."""

    def __init__(self, folder, flip=True, seed=0, images=False):
        self.meta = complete_cache_meta(folder, CACHE_FORMAT, "--latents")
        if images and not self.meta.get("images"):
            raise RuntimeError(f"--latents {folder} holds latents but no images (REPA's encoder needs them): build a "
                               f"new cache with --data-path, --vae and --cache-images into another --latents folder")
        self.folder, self.flip, self.seed, self.epoch, self.images = folder, flip, seed, 0, images
        expected = {"moments": ((2, 2, *self.meta["latent_shape"]), self.meta["dtype"])}
        if images:
            expected["images"] = ((3, self.meta["image_size"], self.meta["image_size"]), np.uint8)
        self.labels = open_shards(folder, self.meta, expected, "latent cache")
        self.shards = collections.OrderedDict()

    def __len__(self):
        return self.meta["count"]

    def __getitem__(self, index):
        k, row = divmod(index, self.meta["shard_images"])
        shard = cached_shard(self.shards, k, lambda k: {kind: np.load(_shard_path(self.folder, k, kind), mmap_mode="r")
                                                        for kind in (("moments", "images") if self.images else ("moments",))})
        flipped = int(self.flip and augment_rng(self.seed, self.epoch, index).random() < 0.5)
        moments = torch.from_numpy(np.array(shard["moments"][row, flipped], dtype=np.float32))
        if not self.images:
            return moments, int(self.labels[index])
        image = torch.from_numpy(np.array(shard["images"][row]))
        return moments, torch.flip(image, dims=[2]) if flipped else image, int(self.labels[index])


def normalize_latents(z, latent):
    """Autoencoder latents -> the generator's space: (z - shift) * scale (DiT's 0.18215 for SD-VAE)
    or per channel (z - mean) / std, as recorded in a recipe's `latent` dict."""
    if latent["norm"] == "scale":
        return (z - latent["shift"]) * latent["scale"]
    mean, std = (torch.tensor(latent[k], device=z.device, dtype=z.dtype).view(1, -1, 1, 1) for k in ("mean", "std"))
    return (z - mean) / std


def denormalize_latents(x, latent):
    """The inverse of normalize_latents (what the autoencoder's decoder takes)."""
    if latent["norm"] == "scale":
        return x / latent["scale"] + latent["shift"]
    mean, std = (torch.tensor(latent[k], device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for k in ("mean", "std"))
    return x * std + mean


# ----------------------------------------------------------------------------- token cache


def build_token_cache(folder, dataset, encode, fingerprint, grid, codebook_size, info=None, batch_size=32,
                      num_workers=4, device="cpu", shard_images=1000):
    """Quantise every image of `dataset` (ADM center crop) and its horizontal flip into `folder`:
    tokens-NNNNN.npy (n, 2 [image, flip], grid, grid) int16 codebook indices, memory-mapped when
    read; labels.npy; meta.json last, with the fingerprint (VQ weights hash, image size, crop), the
    token grid, the codebook size and the labels' names. encode(x) -> (N, grid, grid) indices of a
    [-1, 1] batch. Distributed, resumable and refused for another VQ model as the latent cache.
    Call on every rank; returns the meta dict."""
    if codebook_size > np.iinfo(np.int16).max + 1:
        raise ValueError(f"a codebook of {codebook_size} codes does not fit the cache's int16 tokens")
    _, class_names = dataset_labels(dataset)
    plan = dict(info or {}, **fingerprint, format=TOKEN_CACHE_FORMAT, count=len(dataset), token_grid=grid,
                codebook_size=codebook_size, shard_images=shard_images, shard_kinds=["tokens"],
                num_classes=len(class_names), class_names=class_names)

    def encode_pairs(x):
        x = x.to(device)
        tokens = encode(torch.cat([x, torch.flip(x, dims=[3])])).cpu().numpy().astype(np.int16)  # every image, then every flip
        B = x.shape[0]
        return {"tokens": np.stack([tokens[:B], tokens[B:]], 1)}  # (B, 2, grid, grid)

    build_shards(folder, dataset, plan, (*fingerprint, "count", "shard_images"), encode_pairs, batch_size, num_workers,
                 shard_images, desc="caching tokens")
    return finish_cache(folder, plan, TOKEN_CACHE_FORMAT)


class TokenDataset(torch.utils.data.Dataset):
    """The cached tokens: item i is ((grid, grid) int64 codebook indices, label) of image i or of
    its flip, the flip drawn from (seed, epoch, i) as LatentDataset's (flip=False: never)."""

    def __init__(self, folder, flip=True, seed=0):
        self.meta = complete_cache_meta(folder, TOKEN_CACHE_FORMAT, "--tokens")
        grid = self.meta["token_grid"]
        self.labels = open_shards(folder, self.meta, {"tokens": ((2, grid, grid), np.int16)}, "token cache")
        self.folder, self.flip, self.seed, self.epoch = folder, flip, seed, 0
        self.shards = collections.OrderedDict()

    def __len__(self):
        return self.meta["count"]

    def __getitem__(self, index):
        k, row = divmod(index, self.meta["shard_images"])
        shard = cached_shard(self.shards, k, lambda k: np.load(_shard_path(self.folder, k, "tokens"), mmap_mode="r"))
        flipped = int(self.flip and augment_rng(self.seed, self.epoch, index).random() < 0.5)
        return torch.from_numpy(shard[row, flipped].astype(np.int64)), int(self.labels[index])
