"""Every metric the paper reports: generation metrics (ADM protocol) and autoencoder analysis.

Generators (`gen`, `ref`): the paper scores them with guided-diffusion's `evaluations/evaluator.py`
(ADM): FID, sFID, Inception Score, precision and recall of 50k samples against a reference batch.
That suite needs TensorFlow 1 graphs; this file computes the same numbers with the same Inception
in PyTorch. Autoencoders (`recon`, `equiv`, `id`, `figures`), any number side by side: rFID, PSNR,
SSIM, LPIPS (Tables 1, 12), rFID under latent transforms (Figure 3), the equivariance error of
App. C.3 (Table 1), the intrinsic dimension of the latents (Table 5), Figures 1 (left) and 2.

CPU tiny smoke (random Inception/LPIPS weights: the numbers mean nothing, the run says so):
    python evaluate.py ref --data-path builtin:shapes:32 --image-size 64 --out ref.npz --inception-weights random --preset tiny
    python evaluate.py gen --ref ref.npz --sample builtin:shapes:32:1 --image-size 64 --inception-weights random --preset tiny
    python evaluate.py recon --vae scratch:tiny --vae scratch:tiny-vq --data-path builtin:shapes:8 --image-size 64 --inception-weights random --lpips-random --preset tiny
One GPU (ADM's ImageNet 256 reference batch `VIRTUAL_imagenet256_labeled.npz`, 50k samples from sample.py):
    python evaluate.py gen --ref VIRTUAL_imagenet256_labeled.npz --sample samples/DiT-XL-2-50000.npz
    python evaluate.py equiv --vae sd-vae-ft-ema --vae eq-vae --data-path imagenet/val
torchrun (the Inception and autoencoder passes are split across processes; rank 0 computes the metrics):
    torchrun --nproc_per_node=8 evaluate.py gen --ref VIRTUAL_imagenet256_labeled.npz --sample samples/DiT-XL-2-50000.npz
    torchrun --nproc_per_node=8 evaluate.py recon --vae sd-vae-ft-ema --vae eq-vae --data-path imagenet/val --latent-transform

Rooms: Inception-v3 of the FID literature; input pipeline (TF1 resize, pytorch-fid's resize); image
sources (ADM .npz, folders, builtin:shapes); distributed feature extraction; metrics (Frechet
distance, IS, precision and recall); reference batches and their feature cache; reconstruction
metrics (PSNR, SSIM, LPIPS); intrinsic dimension; autoencoder analysis (data, latents, figures);
subcommands; parser.

Conventions that change the generation numbers (all as ADM's evaluator, unless said):
- uint8 NHWC images go in; TF1's bilinear resize to 299 (no half-pixel centres, no antialiasing;
  bit-identical to TF1's CPU kernel), then (x - 128) / 128. F.interpolate (pytorch-fid) samples
  0.5 * (1 - in/out) pixels away from TF1 (0.07 px for 256 -> 299), which is pytorch-fid's
  residual error against TensorFlow's FID.
- FID on the 2048-d pool_3 features; sFID on the first 7 channels of `mixed_6/conv` (17x17),
  flattened in TensorFlow's (H, W, C) order so that ADM's precomputed `mu_s`, `sigma_s` apply.
- Frechet distance with scipy's sqrtm, the eps=1e-6 retry and the 1e-3 imaginary-part check.
- IS from softmax(pool @ W) with the logits weight W and no bias, splits of 5000, not shuffled.
- Precision/recall: k=3 nearest-neighbour radii on squared L2 distances computed in float16 with a
  float32 fallback per block; reference = the images in the reference batch's `arr_0`.
- A batch's stored statistics (reference or sample) replace those of its images only when it has
  `mu`: then FID uses `mu`, `sigma` and sFID `mu_s`, `sigma_s`; without these two there is no sFID
  (ADM stops). Without `mu`, both come from the images and a lone `mu_s` is ignored. The report
  says where each side's statistics came from.
Deviations: mean and covariance are accumulated in float64 (ADM: float32 mean) and the softmax in
float64; 0 log 0 counts as 0 in IS (ADM would return NaN on an exactly-zero float32 probability).
The autoencoder conventions (our protocol and --protocol eqvae) are in `reconstruction_metrics`,
`AEImages` and the README.
"""
import argparse
import contextlib
import functools
import hashlib
import math
import os
import struct
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from scipy.special import xlogy
from tqdm import tqdm

import models
from data import list_images, load_rgb, make_dataset
from utils import (cleanup, download, fail, is_main, load_checkpoint, print0, rank_and_world, save_labelled_grid,
                   setup_distributed, unwritable_ancestor, write_json)

# ----------------------------------------------------------------------------- constants

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of the 2015-12-05 TF graph
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS
INCEPTION_SIZE = 299  # the graph's input resolution
POOL_DIM = 2048  # pool_3
NUM_LOGITS = 1008  # softmax/logits: 1000 ImageNet classes + 8 unused
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 dims
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
STATISTICS = (("mu", "sigma", POOL_DIM, "FID"), ("mu_s", "sigma_s", SPATIAL_DIM, "sFID"))  # as named in an ADM .npz
IS_SPLIT_SIZE = 5000  # ADM: 10 splits for 50k samples
PR_NEIGHBOURS = 3  # k of the k-NN manifold (ADM's nhood_sizes=(3,))
PR_BLOCK = 10000  # rows/columns of one distance block (ADM's row/col batch size)
NPZ_SCAN_IMAGES = 64  # images per read when checking an .npz's value range
NPZ_READ_BYTES = 1 << 18  # bytes inflated per call from a compressed arr_0: bounds the transient memory
REF_PR_IMAGES = 10000  # images ADM reference batches keep in arr_0 for precision/recall
MIN_FULL_RANK = 2048  # fewer images give a rank-deficient covariance: FID not comparable with papers
FEATURES_VERSION = 1  # bump when feature extraction changes, so cached reference features are recomputed
RANDOM_WARNING = (
    "random Inception weights (--inception-weights random): these numbers are not comparable to anything, "
    "not even to other runs with different data; use them only to check that the pipeline runs"
)



class InputError(ValueError):
    """Bad input (wrong dtype, layout, size or count; missing file): the CLI prints it as one line."""


# ----------------------------------------------------------------------------- Inception-v3 (FID graph)
# The network of the TF graph `classify_image_graph_def.pb` (2015-12-05) that FID, sFID and IS use,
# with the parameter names of torchvision's Inception3, which are those of pytorch-fid's weights file.
# It differs from torchvision's ImageNet model: 1008 logits; every average pool inside a block skips
# the padded zeros (TF's SAME pooling); the last block (Mixed_7c) pools its fourth branch with max.


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (TF's variance epsilon 0.001) -> ReLU. After fuse_batchnorm() the
    conv carries the folded normalisation and bn is an identity."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF averages real pixels only


def max_pool_3x3(x):
    return F.max_pool2d(x, 3, stride=1, padding=1)


class MixedA(nn.Module):
    """35x35 block (graph: mixed, mixed_1, mixed_2): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in, c_pool):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, c_pool, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class MixedB(nn.Module):
    """35x35 -> 17x17 reduction (graph: mixed_3): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (graph: mixed_4 ... mixed_7):
    1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)  # first in the concatenation: channels [0, 192) of the block's output
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(avg_pool_3x3(x))
        return torch.cat([a, b, c, d], 1)


class MixedD(nn.Module):
    """17x17 -> 8x8 reduction (graph: mixed_8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (graph: mixed_9, mixed_10).
    `pool`: "avg" in mixed_9; "max" in mixed_10, a quirk of this graph that FID inherited."""

    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = {"avg": avg_pool_3x3, "max": max_pool_3x3}[pool]
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        d = self.branch_pool(self.pool(x))
        return torch.cat([a, b, c, d], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID graph. forward takes the graph's normalised 299x299 input
    (N, 3, 299, 299) in [-1, 1) (see `preprocess`) and returns a dict of float tensors:
      pool    (N, 2048)  pool_3, the FID / precision / recall features
      spatial (N, 2023)  mixed_6/conv[..., :7] flattened in (H, W, C) order, the sFID features
      logits  (N, 1008)  pool @ fc.weight.T WITHOUT the bias, what ADM's IS takes the softmax of
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, pool="avg")
        self.Mixed_7c = MixedE(2048, pool="max")
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)  # softmax/weights, softmax/biases; the bias is never applied

    def forward(self, x):
        N = x.shape[0]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (N, 768, 17, 17)
        x = self.Mixed_6d(x)  # graph: mixed_6
        # sFID taps `mixed_6/conv`: in the graph each conv scope S holds S/Conv2D and S/batchnorm and
        # its output op S is the ReLU, so the tensor is the 1x1 branch after BN and ReLU. `mixed_6` is
        # Mixed_6d: the graph numbers its blocks mixed (5b), mixed_1 (5c), mixed_2 (5d), mixed_3 (6a,
        # the first 17x17 block), mixed_4..mixed_7 (6b..6e), mixed_8 (7a), mixed_9, mixed_10 (7b, 7c).
        # We checked this mapping against torch-fidelity's TF->PyTorch weight-conversion table (its
        # utils/util_convert_inception_weights.py maps mixed_6/conv/{conv2d_params,batchnorm} to
        # Mixed_6d.branch1x1.{conv,bn}) and against a TF dump script that walks the graph's scopes in
        # order; tests/test_evaluate_gen.py compares with a hook on pytorch-fid's Mixed_6d.branch1x1.
        # The 1x1 branch comes first in the concatenation, so its channels are the block's first ones.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(N, -1)  # (N, 17*17*7), TF's HWC order
        x = self.Mixed_6e(x)  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = F.adaptive_avg_pool2d(x, 1).reshape(N, POOL_DIM)  # pool_3: 8x8 average
        logits = pool @ self.fc.weight.t()  # ADM's IS multiplies by softmax/logits' matrix only
        return {"pool": pool, "spatial": spatial, "logits": logits}

    @torch.no_grad()
    def fuse_batchnorm(self):
        """Fold each eval-mode batch norm into its conv: the same function to about 1e-6 relative, and
        about 5% faster. Call after loading weights; the state dict changes."""
        for m in self.modules():
            if isinstance(m, ConvBN) and isinstance(m.bn, nn.BatchNorm2d):
                conv, bn = m.conv, m.bn
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  bias=True, device="meta")  # no init: both tensors are assigned below
                fused.weight = nn.Parameter(conv.weight * scale[:, None, None, None])
                fused.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
                m.conv, m.bn = fused, nn.Identity()
        return self


def random_inception_weights(seed=0):
    """A seeded random state dict in pytorch-fid's format: He-normal convs and batch-norm statistics
    near identity, so activations stay O(1) through the 94 convolutions. For offline smoke runs and
    tests only."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = FIDInceptionV3()  # skip PyTorch's default init: every tensor is filled below
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked.zero_()
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, POOL_DIM**-0.5, generator=g)
                m.bias.normal_(0, 1.0, generator=g)
    return model.state_dict()


def _sha1_file(path, extra=b""):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    h.update(extra)
    return h.hexdigest()


def load_inception(spec=INCEPTION_WEIGHTS, device="cpu", precision="fp32"):
    """The FID Inception, ready for `inception_features`: eval mode, batch norm folded, channels_last.

    spec: a path to pytorch-fid's weights file; the default name (downloaded once into the cache dir);
    or "random" (seeded random weights; the numbers are then labelled as not comparable).
    precision: "fp32" (TF32 off: the default and the reference), "tf32" (CUDA only) or "bf16" (autocast).
    The returned model carries `info` = {"weights", "id", "comparable"} for logs and cache keys.
    """
    device = torch.device(device)
    if precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"precision {precision!r}: use fp32, tf32 or bf16")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError("--precision tf32 only exists on CUDA devices: use fp32 (or bf16) on CPU")
    with torch.device("meta"):
        model = FIDInceptionV3()  # tensors come from the state dict (assign=True), no wasted init
    if spec == "random":
        state, info = random_inception_weights(0), {"weights": "random", "id": "random-seed0", "comparable": False}
    else:
        if os.path.isfile(spec):
            path = spec
        elif spec == INCEPTION_WEIGHTS:
            try:
                path = download(INCEPTION_URL, INCEPTION_WEIGHTS)
            except RuntimeError as e:
                raise RuntimeError(
                    f"{e}\nOr pass --inception-weights PATH to a copy of {INCEPTION_WEIGHTS}; "
                    f"--inception-weights random runs offline, with numbers that are not comparable to anything."
                ) from None
        else:
            raise FileNotFoundError(
                f"--inception-weights {spec}: no such file. Give a path to {INCEPTION_WEIGHTS} "
                f"(from {INCEPTION_URL}), its name alone to download it, or `random` for a smoke run."
            )
        state = load_checkpoint(path)
        info = {"weights": path, "id": f"{os.path.basename(path)}:{_sha1_file(path)[:12]}", "comparable": True}
    if not isinstance(state, dict):
        raise RuntimeError(f"{info['weights']} holds a {type(state).__name__}, not a state dict: not {INCEPTION_WEIGHTS}")
    state = dict(state)
    for k in model.state_dict():  # old torch saves lack this counter, unused in eval mode
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, torch.zeros((), dtype=torch.long))
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"{info['weights']} is not pytorch-fid's Inception weights file ({INCEPTION_WEIGHTS}): {str(e)[:600]}"
        ) from None
    model.float().fuse_batchnorm().eval().requires_grad_(False)
    # channels_last: ~1.4x faster on CPU (oneDNN) and for cuDNN's tf32/bf16 kernels; for true fp32 on
    # an H200, NCHW was 1.26x faster (bench.py, 2026-11-28), so CUDA fp32 stays NCHW
    fp32_cuda = torch.device(device).type == "cuda" and precision == "fp32"
    model.memory_format = torch.contiguous_format if fp32_cuda else torch.channels_last
    model = model.to(device, memory_format=model.memory_format)
    model.precision, model.info = precision, info
    return model


# ----------------------------------------------------------------------------- input pipeline


@functools.lru_cache(maxsize=16)
def _tf1_source_coords(in_size, out_size):
    """Where TF1's ResizeBilinear (align_corners=False, half_pixel_centers=False) samples each output
    pixel along one axis, in the kernel's float32 arithmetic: src = float(out_index) * float(in / out).
    Returns (lower index, upper index, weight of upper) on the CPU."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = torch.floor(src)
    hi = torch.clamp(lo.long() + 1, max=in_size - 1)  # TF clamps ceil(src); differs only where the weight is 0
    return lo.long(), hi, src - lo


def tf1_resize_bilinear(x, size):
    """Bilinear resize of (N, C, H, W) float32 as TensorFlow 1's legacy kernel, the one inside ADM's
    graph: no half-pixel offset, no antialiasing, each output a + (b - a) * t in float32 along x, then
    along y. Bit-identical to TF1's CPU kernel; on GPU TF fuses the multiply-add, which can differ by
    about one float32 ulp. F.interpolate(align_corners=False) samples at other positions."""
    H, W = x.shape[-2:]
    out_h, out_w = (size, size) if isinstance(size, int) else size
    y0, y1, fy = (t.to(x.device) for t in _tf1_source_coords(H, out_h))
    x0, x1, fx = (t.to(x.device) for t in _tf1_source_coords(W, out_w))
    x = x.permute(0, 2, 3, 1)  # (N, H, W, C): gathers along H and W then copy whole pixels (fast)
    # interpolate every input row along x once (the kernel's `top` and `bottom` are such rows), then along y
    left, right = x.index_select(2, x0), x.index_select(2, x1)  # (N, H, out_w, C)
    rows = left + (right - left) * fx[:, None]
    top, bottom = rows.index_select(1, y0), rows.index_select(1, y1)  # (N, out_h, out_w, C)
    return (top + (bottom - top) * fy[:, None, None]).permute(0, 3, 1, 2)  # (N, C, out_h, out_w), channels_last


def preprocess(images, device):
    """uint8 (N, H, W, 3) array or tensor -> the graph's input: float32 (N, 3, 299, 299), TF1-resized,
    then (x - 128) / 128 (the graph's Sub and Mul; [0, 255] -> [-1, 0.9921875])."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()  # (N, 3, H, W) view of NHWC memory, 0..255
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = tf1_resize_bilinear(x, INCEPTION_SIZE)
    x = (x - 128.0) / 128.0  # division by a power of two: bit-identical to the graph's multiply by 1/128
    return x.contiguous(memory_format=torch.channels_last)  # no copy: already NHWC in memory


def preprocess_pytorch_fid(images, device):
    """uint8 (N, H, W, 3) -> pytorch-fid's input (the official EQ-VAE eval computes rFID with it):
    x / 255 (ToTensor on the saved PNGs), F.interpolate bilinear to 299 (align_corners=False, no
    antialiasing; applied even at 299, where it is the identity), then 2x - 1. Same network, other
    resize and scaling than ADM's graph (see `preprocess`)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return (2 * x - 1).contiguous(memory_format=torch.channels_last)


FID_PIPELINES = {"adm": preprocess, "pytorch-fid": preprocess_pytorch_fid}


@contextlib.contextmanager
def _precision_context(precision, device):
    """fp32: TF32 off for convs and matmuls (PyTorch enables it for cuDNN convs by default); tf32: on;
    bf16: autocast. Restores the global flags afterwards."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.inference_mode()
def inception_features(model, images, pipeline="adm"):
    """Features of one batch of uint8 (N, H, W, 3) images: {"pool", "spatial", "logits"} as float32
    tensors on the model's device (see FIDInceptionV3). pipeline: "adm" (`preprocess`, every metric
    of this file by default) or "pytorch-fid" (`preprocess_pytorch_fid`, for --protocol eqvae)."""
    device = next(model.parameters()).device
    x = FID_PIPELINES[pipeline](images, device).contiguous(memory_format=getattr(model, "memory_format", torch.channels_last))
    with _precision_context(getattr(model, "precision", "fp32"), device):
        out = model(x)
    return {k: v.float() for k, v in out.items()}


# ----------------------------------------------------------------------------- image sources
# Every source is a map-style dataset whose items are uint8 (H, W, 3) numpy arrays, all of one size.


def _read_npy_header(f):
    """(shape, fortran, dtype) of the .npy stream `f`, which is left at the first byte of the array."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(f)


def _npz_member_layout(path, key):
    """(shape, dtype, offset, fortran) of `key` in an .npz from its headers only; offset is where the
    raw array starts in the file, or None when the member is compressed (no memory map possible)."""
    with zipfile.ZipFile(path) as zf:
        name = key + ".npy"
        if name not in zf.namelist():
            keys = ", ".join(n[:-4] for n in zf.namelist())
            raise InputError(f"{path} has no `{key}` array (it has: {keys}); an ADM batch keeps its images in arr_0")
        info = zf.getinfo(name)
        with zf.open(name) as f:
            shape, fortran, dtype = _read_npy_header(f)
            header_len = f.tell() if hasattr(f, "tell") else None
    offset = None
    if info.compress_type == zipfile.ZIP_STORED and not fortran and header_len is not None:
        with open(path, "rb") as f:  # local file header: 30 fixed bytes, then the name and extra fields
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offset = info.header_offset + 30 + name_len + extra_len + header_len
    return tuple(shape), dtype, offset, fortran


def check_image_array(shape, dtype, chunks, source):
    """Refuse anything but uint8 (N, H, W, 3) in [0, 255], naming the source and the fix. `chunks`
    yields the images in order, a few at a time, and is read lazily: the first chunk gives the value
    range; the rest only while every value seen is 0 or 1, so that a batch is refused as "[0, 1]
    floats cast to uint8" only when all of it looks so (a batch may start with black images)."""
    if len(shape) == 4 and shape[1] in (1, 3) and shape[-1] not in (1, 3):
        gray = " then np.repeat(x, 3, axis=-1) for grayscale" if shape[1] == 1 else ""
        raise InputError(
            f"{source}: images of shape {shape} look NCHW; ADM batches are NHWC (N, H, W, 3): "
            f"convert with arr.transpose(0, 2, 3, 1){gray}"
        )
    if len(shape) != 4 or shape[-1] != 3:
        fix = ("; grayscale: np.repeat(x[..., None], 3, axis=-1)" if len(shape) == 3 else
               "; grayscale: np.repeat(x, 3, axis=-1)" if len(shape) == 4 and shape[-1] == 1 else
               "; RGBA: composite on white, or x[..., :3] where alpha is 255" if len(shape) == 4 and shape[-1] == 4 else "")
        raise InputError(f"{source}: images must have shape (N, H, W, 3) (RGB, NHWC), got {shape}{fix}")
    if dtype.hasobject:
        raise InputError(f"{source}: images are Python objects ({dtype}); ADM batches are uint8 arrays")
    chunks = iter(chunks)
    head = next(chunks, np.zeros(0, dtype))
    if dtype != np.uint8:
        seen = f", values in [{head.min()}, {head.max()}] in the first {len(head)}" if head.size else ""
        if np.issubdtype(dtype, np.floating) and head.size and head.min() >= -1.0 and head.max() <= 1.0:
            fix = ("from [-1, 1] with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8), "
                   "from [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8)")
        elif dtype == np.bool_:
            fix = "with x.astype(np.uint8) * 255"
        else:
            fix = "with x.round().clip(0, 255).astype(np.uint8) if they are in [0, 255]"
        raise InputError(f"{source}: images are {dtype}{seen}; ADM batches are uint8 in [0, 255]. Convert them {fix}")
    if head.size and head.max() <= 1 and all(chunk.max() <= 1 for chunk in chunks):  # stops at the first brighter chunk
        raise InputError(
            f"{source}: all {shape[0]} uint8 images have only the values 0 and 1: they look like [0, 1] "
            f"images cast to uint8; save (x * 255).round().astype(np.uint8) instead"
        )


class NpzImages(torch.utils.data.Dataset):
    """`arr_0` of an ADM .npz, without any process holding the whole array (50k images at 256 px are
    9.8 GB). Stored uncompressed (np.savez, as ADM and sample.py write it): memory-mapped, read in
    any order. Compressed (np.savez_compressed): inflated from the zip as a stream, as ADM reads it;
    each process opens its own reader, which only moves forward (`stream` is True: extract_features
    reads such a file in order, with one worker). A Fortran-order array, which neither way can
    slice, is loaded whole, as ADM does."""

    def __init__(self, path, key="arr_0"):
        self.path, self.key, self.source = path, key, path
        self.shape, self.dtype, self.offset, fortran = _npz_member_layout(path, key)
        self.stream = self.offset is None and not fortran
        self._arr = self._zip = self._reader = None  # opened lazily in each process: neither may be pickled or shared
        check_image_array(self.shape, self.dtype, self._chunks(), f"{path} ({key})")
        self._close_stream()  # the main process holds no reader that forked DataLoader workers would inherit
        self.image_size = tuple(self.shape[1:3])

    def array(self):
        if self._arr is None:
            if self.offset is not None:
                self._arr = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
            else:
                with np.load(self.path) as f:
                    self._arr = f[self.key]
        return self._arr

    def _open_stream(self):
        self._close_stream()
        self._zip = zipfile.ZipFile(self.path)
        self._reader = self._zip.open(self.key + ".npy")
        _read_npy_header(self._reader)
        self._pid, self._pos = os.getpid(), 0  # _pos: index of the next image in the stream

    def _close_stream(self):
        if self._reader is not None and self._pid == os.getpid():  # a forked child only drops its parent's handles
            self._reader.close()
            self._zip.close()
        self._zip = self._reader = None

    def _take(self, nbytes, out=None):
        """The next nbytes of the stream into `out` (a byte view of that size), or dropped when out is
        None, NPZ_READ_BYTES at a time: the memory used besides `out` does not grow with nbytes."""
        done = 0
        while done < nbytes:
            piece = self._reader.read(min(NPZ_READ_BYTES, nbytes - done))
            if not piece:
                raise InputError(f"{self.path} ({self.key}): the compressed array ends early (truncated file): write it again")
            if out is not None:
                out[done : done + len(piece)] = piece
            done += len(piece)

    def read(self, start, stop):
        """Images start..stop-1 as one (stop - start, H, W, 3) array."""
        if not self.stream:
            return np.asarray(self.array()[start:stop])
        if self._reader is None or self._pid != os.getpid() or start < self._pos:
            self._open_stream()  # a deflate stream cannot go back; a forked worker must not share its parent's file offset
        item = math.prod(self.shape[1:]) * self.dtype.itemsize
        self._take((start - self._pos) * item)  # inflate and drop the images before `start` (other workers' batches)
        x = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        self._take(x.nbytes, memoryview(x).cast("B"))
        self._pos = stop
        return x

    def _chunks(self, size=NPZ_SCAN_IMAGES):
        for i in range(0, len(self), size):
            yield self.read(i, min(i + size, len(self)))

    def __getstate__(self):
        return {**self.__dict__, "_arr": None, "_zip": None, "_reader": None}

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        index = index + len(self) if index < 0 else index
        if self.stream:
            return self.read(index, index + 1)[0]
        return np.ascontiguousarray(self.array()[index])


def _image_size(path):
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:
        return f"{type(e).__name__}: {e}"


class FolderImages(torch.utils.data.Dataset):
    """Every image under a folder (recursive, sorted), read as-is: they must all have one size."""

    def __init__(self, root):
        self.source, self.paths = root, list_images(root)
        if not self.paths:
            raise InputError(f"{root}: no image found (give a folder of PNG/JPEG files or an ADM .npz)")
        with ThreadPoolExecutor(8) as pool:
            sizes = list(pool.map(_image_size, self.paths))
        bad = [(p, s) for p, s in zip(self.paths, sizes) if isinstance(s, str)]
        if bad:
            raise InputError(f"{root}: {len(bad)} unreadable image(s), e.g. {bad[0][0]} ({bad[0][1]}): remove or re-save them")
        first = sizes[0]
        odd = [(p, s) for p, s in zip(self.paths, sizes) if s != first]
        if odd:
            raise InputError(
                f"{root}: images of different sizes: {self.paths[0]} is {first[0]}x{first[1]} but {odd[0][0]} is "
                f"{odd[0][1][0]}x{odd[0][1][1]} ({len(odd)} differ). Resize or center-crop them to one size first "
                f"(`python evaluate.py ref --data-path DIR --image-size S` applies ADM's center crop)"
            )
        self.image_size = (first[1], first[0])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return np.asarray(load_rgb(self.paths[index]), dtype=np.uint8)


class CroppedImages(torch.utils.data.Dataset):
    """A data.py dataset (folder with ADM center crop, or builtin:shapes) as uint8 HWC images."""

    def __init__(self, data_path, image_size):
        self.dataset = make_dataset(data_path, image_size, crop="adm")
        self.source = data_path
        self.image_size = (image_size, image_size)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, _ = self.dataset[index]  # (3, H, W) in [-1, 1], made as u8 / 127.5 - 1: the round trip is exact
        return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def open_images(path, image_size=None):
    """An ADM .npz (arr_0), a folder of same-size images (as-is), or builtin:shapes[:N[:SEED]]
    (rendered at image_size) as a dataset of uint8 (H, W, 3) arrays."""
    if path.startswith("builtin:"):
        if image_size is None:
            raise InputError(f"{path} needs --image-size")
        try:
            return CroppedImages(path, image_size)
        except ValueError as e:
            raise InputError(str(e)) from None
    if os.path.isdir(path):
        return FolderImages(path)
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist: give an ADM .npz, a folder of images or builtin:shapes")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not an .npz archive (np.savez; or it is truncated) nor a folder of images")
    return NpzImages(path)


def _stack(batch):
    return torch.from_numpy(np.stack(batch))


# ----------------------------------------------------------------------------- distributed feature extraction


class RunningStats:
    """Mean and covariance (np.cov semantics, divisor N - 1) accumulated batch by batch in float64,
    summed across ranks once at the end; no feature matrix is kept."""

    def __init__(self, dim, device):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x):
        x = x.double()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.t() @ x

    def all_reduce(self):
        if rank_and_world()[1] > 1:
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())
        return self

    def finalize(self):
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = (sigma + sigma.t()) / 2  # exact symmetry, as np.cov gives
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _gather_rows(local, counts, device):
    """Concatenate each rank's rows (rank order) on every rank; `counts` rows per rank, known to all."""
    if len(counts) == 1:
        return local
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(max(max(counts), 1), local.shape[1], dtype=local.dtype, device=on)
    padded[: local.shape[0]] = local.to(on)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])


def extract_features(model, images, batch_size=64, num_workers=4, keep=("pool",), stats=(), keep_mask=None, desc="Inception"):
    """Inception features of a dataset of uint8 (H, W, 3) images, split across torchrun processes.

    Every rank must call it (collectives inside). Rank r takes the r-th contiguous shard.
    keep: feature kinds ("pool", "spatial", "logits") returned per image, for the images where
    keep_mask (bool, len(images)) is true, or all; stats: kinds whose mean and covariance are
    accumulated over all images.
    Returns (features, statistics) on every rank: features[kind] float32 numpy (rows in dataset
    order); statistics[kind] = (mu, sigma) float64 numpy.
    """
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    n = len(images)
    per = -(-n // world)
    bounds = [(min(r * per, n), min((r + 1) * per, n)) for r in range(world)]
    start, end = bounds[rank]
    mask = np.ones(n, dtype=bool) if keep_mask is None else np.asarray(keep_mask, dtype=bool)
    dims = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_LOGITS}
    kept = {k: [] for k in keep}
    running = {k: RunningStats(dims[k], device) for k in stats}
    if getattr(images, "stream", False) and num_workers > 1:
        # one deflate stream: each worker would inflate it all up to its own batches, so extra workers
        # add CPU time, not speed; one worker still reads while the main process runs Inception
        print0(f"{images.source}: arr_0 is compressed, so one DataLoader worker reads it in order "
               f"(np.savez stores it uncompressed: memory-mapped and read by --num-workers workers)")
        num_workers = 1
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(images, range(start, end)), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=_stack, pin_memory=device.type == "cuda",
    )
    bar = tqdm(total=end - start, desc=desc, unit="img", disable=not is_main(), dynamic_ncols=True)
    pos = start
    for batch in loader:
        feats = inception_features(model, batch)
        rows = torch.from_numpy(mask[pos : pos + len(batch)]).to(device)
        for k in keep:
            kept[k].append(feats[k][rows].cpu())
        for k in stats:
            running[k].update(feats[k])
        pos += len(batch)
        bar.update(len(batch))
    bar.close()
    counts = [int(mask[a:b].sum()) for a, b in bounds]
    features = {}
    for k in keep:
        local = torch.cat(kept[k]) if kept[k] else torch.zeros(0, dims[k])
        features[k] = _gather_rows(local, counts, device).numpy()
    statistics = {k: running[k].all_reduce().finalize() for k in stats}
    return features, statistics


# ----------------------------------------------------------------------------- metrics


def compute_statistics(features):
    """(mu, sigma) of an (N, D) feature matrix as ADM computes them: mean, np.cov(rowvar=False)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need an (N >= 2, D) feature matrix, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(sigma1 @ sigma2) for symmetric PSD inputs by symmetric eigendecompositions: with
    sigma1 = V diag(w) V^T, the eigenvalues of sqrt(S1) S2 sqrt(S1) (those of S1 S2) are those of
    diag(w)^1/2 V^T S2 V diag(w)^1/2 on the range of S1. Eigenvalues of S1 below the usual rank
    tolerance (round-off) are dropped, which also makes rank-deficient (few-image) statistics cheap.
    About 5x faster than scipy's sqrtm at 2048-d."""
    w, v = np.linalg.eigh(np.asarray(sigma1, dtype=np.float64))
    keep = w > w.max(initial=0.0) * len(w) * np.finfo(np.float64).eps
    b = v[:, keep] * np.sqrt(w[keep])  # (D, r)
    m = b.T @ np.asarray(sigma2, dtype=np.float64) @ b  # (r, r)
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="scipy"):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)).

    method "scipy" is ADM's (and TTUR's) computation, the one to report: scipy.linalg.sqrtm of the
    product; if that is not finite, retry with eps added to both diagonals; a complex result is
    accepted only when its diagonal's imaginary part is within 1e-3 of 0, then its real part is used.
    method "eigh" uses trace_sqrt_product (same value to ~1e-10 relative on real covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    elif method == "scipy":
        # ADM passes disp=False (deprecated in SciPy 1.16, removed in 1.18); it changes no value
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: the covariance product is singular; adding {eps} to both diagonals", stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag))}")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method {method!r}: use scipy or eigh")
    # a distance: round-off takes identical sets to -3e-5 (ADM reports that raw value), not below 0
    return max(0.0, float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def frechet_distance_from_features(features1, features2):
    """The Frechet distance of two feature sets (N, D) with few rows (N <= D), without D x D matrices.

    With A the centred features / sqrt(N - 1), sigma = A^T A; the nonzero eigenvalues of
    sigma1 sigma2 = A1^T (A1 A2^T) A2 are those of M M^T with M = A1 A2^T, so tr sqrt(sigma1 sigma2)
    is the sum of M's singular values, and tr sigma = |A|^2. Exactly the FID of the covariances
    (np.cov semantics), to round-off, in float64."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if len(f1) < 2 or len(f2) < 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"need two (N >= 2, D) feature sets of one dimension, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = (f1 - mu1) / math.sqrt(len(f1) - 1), (f2 - mu2) / math.sqrt(len(f2) - 1)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_covmean)


def inception_probs(pool, fc_weight, device=None):
    """ADM's IS input: softmax(pool @ W^T) of the pool features, W the (1008, 2048) logits matrix,
    no bias. The product in float32 (as the graph's MatMul; 50k x 2048 x 1008 in float64 would take
    minutes on a CPU), the softmax in float64. Returns float64 numpy (N, 1008)."""
    pool = torch.as_tensor(np.asarray(pool, np.float32), device=device)
    logits = (pool @ torch.as_tensor(fc_weight, dtype=torch.float32, device=device).t()).double()
    return torch.softmax(logits, dim=1).cpu().numpy()


def inception_score(probs, split_size=IS_SPLIT_SIZE):
    """exp(E_x KL(p(y|x) || p(y))) per consecutive split of `split_size` rows (the last may be
    shorter), averaged over splits; no shuffling. As ADM (improved-GAN's formula), with 0 log 0 = 0."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def pairwise_sq_dists(a, b, fp16=True):
    """Squared L2 distances (len(a), len(b)) as ADM's DistanceBlock computes them:
    max(|a|^2 - 2 a.b^T + |b|^2, 0) with inputs, norms, products and sums rounded to float16
    (products accumulated in float32, as a GPU half matmul does); if any float16 value overflows,
    the whole block is recomputed in float32, the fallback ADM takes. Returns float32."""
    if fp16:
        a16, b16 = a.half().float(), b.half().float()  # tf.cast(..., float16)
        na = (a16 * a16).half().float().sum(1).half()  # reduce_sum(square(U)) in half
        nb = (b16 * b16).half().float().sum(1).half()
        ab = (a16 @ b16.t()).half()
        d = ((na[:, None] - 2 * ab) + nb[None, :]).clamp_min(0)
        if torch.isfinite(d).all():
            return d.float()
    na, nb = (a * a).sum(1), (b * b).sum(1)
    return ((na[:, None] - 2 * (a @ b.t())) + nb[None, :]).clamp_min(0)


def manifold_radii(features, k=PR_NEIGHBOURS, block_size=PR_BLOCK, fp16=True):
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself counted
    at distance 0, so the (k+1)-th smallest), over column blocks with a running top-(k+1): memory
    stays at block_size^2 whatever N is."""
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} images per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for i in range(0, n, block_size):
        rows, best = features[i : i + block_size], None
        for j in range(0, n, block_size):
            d = pairwise_sq_dists(rows, features[j : j + block_size], fp16)
            d = d if best is None else torch.cat([best, d], 1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False, sorted=True).values
        radii[i : i + block_size] = best[:, k]
    return radii


def precision_recall(ref_features, sample_features, k=PR_NEIGHBOURS, block_size=PR_BLOCK, fp16_distances=True, device=None):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as ADM computes them.

    precision: fraction of samples within the k-NN radius of at least one reference point;
    recall: fraction of reference points within the k-NN radius of at least one sample. Radii and
    comparisons use squared distances (point on the sphere counts as inside). Returns (precision, recall).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    ref = torch.as_tensor(np.asarray(ref_features, np.float32), device=device)
    sample = torch.as_tensor(np.asarray(sample_features, np.float32), device=device)
    ref_radii = manifold_radii(ref, k, block_size, fp16_distances)
    sample_radii = manifold_radii(sample, k, block_size, fp16_distances)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=device)
    for i in range(0, len(ref), block_size):
        for j in range(0, len(sample), block_size):
            d = pairwise_sq_dists(ref[i : i + block_size], sample[j : j + block_size], fp16_distances)  # (r, s)
            ref_in[i : i + block_size] |= (d <= sample_radii[None, j : j + block_size]).any(1)
            sample_in[j : j + block_size] |= (d <= ref_radii[i : i + block_size, None]).any(0)
    return float(sample_in.double().mean()), float(ref_in.double().mean())


# ----------------------------------------------------------------------------- reference batches and cache


def _features_key(path, model):
    extra = f"|{model.info['id']}|{model.precision}|v{FEATURES_VERSION}".encode()
    return _sha1_file(path, extra)[:16]


def _cache_path(path, key):
    return f"{os.path.splitext(path)[0]}.features-{key}.npz"


def _save_npz_atomic(path, **arrays):
    """np.savez (uncompressed, so arr_0 can be memory-mapped) to a temp file, then rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _broadcast(obj):
    """Rank 0's value on every rank (decisions that touch the file system are taken once)."""
    if rank_and_world()[1] == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def npz_statistics(path, what):
    """The FID/sFID statistics stored in an ADM .npz (reference or sample), taken as ADM's evaluator
    takes them: only when the file has `mu`. Then FID uses mu/sigma and sFID mu_s/sigma_s; without
    these there is no sFID (ADM stops; sFID from the images against file statistics of other images
    would be another number). Without `mu` both come from the images and a lone mu_s/sigma_s is
    ignored (never mixed with image statistics). `what` names the file in notes.
    Returns ({"mu", "sigma"[, "mu_s", "sigma_s"]: float64 arrays} or {} for "use the images", notes)."""
    stats, notes = {}, []
    with np.load(path) as f:
        names = set(f.files)
        if "mu" not in names:
            if "mu_s" in names:
                notes.append(f"{what} has mu_s/sigma_s but no mu/sigma: as ADM's evaluator, FID and sFID statistics "
                             f"both come from its images and the file's mu_s/sigma_s are ignored")
            return stats, notes
        for m, s, dim, metric in STATISTICS:
            if m not in names:
                continue
            if s not in names:
                raise InputError(f"{path} has `{m}` but not `{s}`: an ADM batch stores both; add `{s}` or remove `{m}`")
            mu, sigma = f[m].astype(np.float64), f[s].astype(np.float64)
            if mu.shape != (dim,) or sigma.shape != (dim, dim):
                raise InputError(
                    f"{path}: `{m}` {mu.shape} and `{s}` {sigma.shape} are not {metric} statistics of the FID Inception "
                    f"(({dim},) and ({dim}, {dim})); remove them from the file to compute statistics from its images"
                )
            stats[m], stats[s] = mu, sigma
    if "mu_s" not in stats:
        notes.append(f"{what} has mu/sigma but no mu_s/sigma_s: sFID not computed (ADM's evaluator stops on such a "
                     f"file; sFID of images against another set's file statistics would not be ADM's number)")
    return stats, notes


def _statistics_source(stats_from, num_images, spatial):
    """Where one side's FID/sFID statistics came from, for the report."""
    if stats_from == "images":
        return f"computed from {num_images} images"
    return "mu, sigma, mu_s, sigma_s from the file" if spatial else "mu, sigma from the file (no mu_s, sigma_s: no sFID)"


def reference_batch(path, model, batch_size=64, num_workers=4, image_size=None, use_cache=True):
    """Pool features (for precision/recall) and FID/sFID statistics of a reference.

    An ADM reference .npz: arr_0 images, and stored statistics taken as `npz_statistics` says (as
    ADM). For an .npz the result is cached next to it, keyed by the sha1 of the file, the Inception
    weights and the precision, so a second evaluation costs only the sample side. A folder or
    builtin:shapes works too (never cached). Every rank must call it; the returned arrays are
    complete on rank 0 (other ranks may get None after a cache hit).
    Returns dict(pool, mu, sigma, mu_s, sigma_s (None when unavailable), num_images, image_size,
    stats_from ("file" or "images": FID and sFID statistics always come from one place), notes,
    cache (path or None)).
    """
    is_npz = os.path.isfile(path) and zipfile.is_zipfile(path)
    given, notes, images = {}, [], None
    if is_npz:
        given, notes = npz_statistics(path, f"reference {path}")
        with zipfile.ZipFile(path) as zf:
            has_images = "arr_0.npy" in zf.namelist()
        if not has_images and not given:
            raise InputError(f"{path} has neither arr_0 images nor mu/sigma statistics: not an ADM reference batch")
        if has_images:
            images = NpzImages(path)
    else:
        images = open_images(path, image_size)
    out = dict(pool=None, mu=None, sigma=None, mu_s=None, sigma_s=None, cache=None, notes=notes)
    out.update(given)
    out["stats_from"] = "file" if given else "images"
    out["num_images"] = len(images) if images is not None else 0
    out["image_size"] = images.image_size if images is not None else None
    if images is None:
        return out
    need_stats = () if given else ("pool", "spatial")
    if need_stats and len(images) < 2:
        raise InputError(f"reference {path} has {len(images)} image(s) and no statistics: FID needs at least 2")

    # the cache holds pool features, plus the statistics when they come from the images; a cache
    # without what this run needs (one written by an older version) counts as a miss
    needed = ["pool"] + ([name for m, s, _, _ in STATISTICS for name in (m, s)] if need_stats else [])
    cache, hit = None, False
    if is_npz and use_cache:
        if is_main():
            cache = _cache_path(path, _features_key(path, model))
            if os.path.isfile(cache):
                try:
                    with np.load(cache) as f:
                        hit = set(needed) <= set(f.files)
                except (OSError, ValueError, zipfile.BadZipFile) as e:  # a damaged copy: recomputed and rewritten
                    warnings.warn(f"the feature cache {cache} is unreadable ({e}): recomputing it", stacklevel=2)
        cache, hit = _broadcast((cache, hit))
    if hit:
        if is_main():
            with np.load(cache) as f:
                out.update({k: f[k] for k in needed})
        out["cache"] = cache
        return out

    features, stats = extract_features(model, images, batch_size, num_workers, keep=("pool",), stats=need_stats, desc="reference")
    out["pool"] = features["pool"]
    for kind, (m, s) in (("pool", ("mu", "sigma")), ("spatial", ("mu_s", "sigma_s"))):
        if kind in stats:
            out[m], out[s] = stats[kind]
    if cache is not None and is_main():
        try:
            _save_npz_atomic(cache, **{k: out[k] for k in needed})
            out["cache"] = cache
        except OSError as e:
            warnings.warn(f"could not write the feature cache {cache} ({e}); the next run recomputes it", stacklevel=2)
    return out


# ----------------------------------------------------------------------------- reconstruction metrics (PSNR, SSIM, LPIPS)
# Table 12 (App. C.2). Every metric is computed per image, then averaged over images.

AE_PROTOCOLS = ("ours", "eqvae")
SSIM_SIGMA = 1.5  # Wang et al. 2004: Gaussian window with sigma 1.5 ...
SSIM_TRUNCATE = 3.5  # ... cut at radius int(3.5 * 1.5 + 0.5) = 5: 11x11 (skimage's and torchmetrics' rule)
SSIM_K1, SSIM_K2 = 0.01, 0.03
LPIPS_RANDOM_WARNING = ("random LPIPS-VGG backbone (--lpips-random): the LPIPS values are not comparable to anything; "
                        "use them only to check that the pipeline runs")


def ssim_window(sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, device=None):
    """The normalised 1-D Gaussian of the SSIM window, float64; the 2-D window is its outer product."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim(x, y, data_range=1.0):
    """Per-image SSIM (Wang et al. 2004) of (N, C, H, W) images: 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, population (not sample) variances, averaged over the pixels where the whole
    window lies inside the image and over channels. That region is the one skimage's
    structural_similarity averages (it filters with reflection, then crops (11 - 1) // 2 = 5 pixels
    per border) and the one torchmetrics averaged before 1.5 (its PR #2721 averages over the
    reflected border too). data_range: a float or an (N,) tensor. Float64 throughout; returns (N,)."""
    x, y = x.double(), y.double()
    N, C, H, W = x.shape
    w = ssim_window(device=x.device)
    k = len(w)
    if H < k or W < k:
        raise ValueError(f"SSIM needs images of at least {k}x{k} pixels, got {H}x{W}")

    def blur(t):  # separable 'valid' Gaussian filter of every channel
        t = t.reshape(-1, 1, H, W)
        return F.conv2d(F.conv2d(t, w.view(1, 1, k, 1)), w.view(1, 1, 1, k))

    mx, my, xx, yy, xy = blur(torch.cat([x, y, x * x, y * y, x * y])).reshape(5, N, C, H - k + 1, W - k + 1)
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    R = torch.as_tensor(data_range, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (SSIM_K1 * R) ** 2, (SSIM_K2 * R) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruction_metrics(x, rec, protocol="ours", lpips_net=None):
    """Per-image PSNR (dB), SSIM and LPIPS of reconstructions `rec` against originals `x`, both
    (N, 3, H, W) in [-1, 1]. Returns a dict of (N,) float64 CPU tensors ("lpips" only with a net).

    ours: all three on the uint8 images a PNG would hold (models.to_uint8: 127.5 x + 128, clamped):
      PSNR on the uint8 values, SSIM on uint8 / 255 with data_range 1, LPIPS on uint8 / 127.5 - 1.
    eqvae (the official eval): PSNR the same (it reads its saved PNGs); SSIM and LPIPS on the
      unclamped decoder output, SSIM's data_range inferred per image as torchmetrics does when
      given none (the larger of the two images' max - min; the official eval runs batch size 1).
    PSNR is +inf for an image reconstructed exactly.
    """
    out = {"psnr": models.psnr(x, rec).double()}
    if protocol == "ours":
        xq, rq = models.to_uint8(x).double(), models.to_uint8(rec).double()
        out["ssim"] = ssim(xq / 255.0, rq / 255.0, data_range=1.0)
        a, b = xq / 127.5 - 1.0, rq / 127.5 - 1.0
    elif protocol == "eqvae":
        span = lambda t: t.flatten(1).amax(1) - t.flatten(1).amin(1)  # noqa: E731
        out["ssim"] = ssim(rec, x, data_range=torch.maximum(span(rec), span(x)).double())
        a, b = x, rec
    else:
        raise ValueError(f"protocol {protocol!r}: use one of {AE_PROTOCOLS}")
    if lpips_net is not None:
        out["lpips"] = lpips_net(b.float(), a.float()).flatten().double()
    return {k: v.cpu() for k, v in out.items()}


# ----------------------------------------------------------------------------- intrinsic dimension
# Table 5. Latent codes are flattened to vectors; neighbours by Euclidean distance.

MLE_NEIGHBOURS = 20  # k of Levina-Bickel's MLE (Pope et al. 2021 use 20 for images)
TWONN_DISCARD = 0.1  # Facco et al. 2017 fit without the 10% largest ratios mu
KNN_BLOCK = 4096  # rows and columns of one distance block: block^2 floats whatever the number of points


def unique_points(points):
    """Drop exact duplicate rows (a zero distance breaks both estimators). Returns (points, count dropped)."""
    unique = torch.unique(points, dim=0)
    return unique, len(points) - len(unique)


def image_hashes(x):
    """(N,) int64 content hashes of a batch of images. Duplicate images are found on their pixels:
    their latents differ in the last bits when encoded in batches of other sizes (1e-7 apart), which
    no exact comparison catches and which breaks both estimators as a zero distance would."""
    digest = lambda image: hashlib.blake2b(image.numpy().tobytes(), digest_size=8).digest()  # noqa: E731
    return torch.tensor([int.from_bytes(digest(image), "little", signed=True) for image in x.cpu()], dtype=torch.int64)


@torch.no_grad()
def knn_distances(points, k, rows=None, block_size=KNN_BLOCK):
    """Euclidean distances (float64, ascending) from the points `rows` (indices; default all) to their
    k nearest neighbours among `points` (N, D), the point itself excluded by index. Candidates come
    from |a|^2 - 2 a.b + |b|^2 in float32 over blocks (memory block_size^2), keeping a running top
    k + 8; the candidates are then measured again exactly, as float64 differences, and sorted."""
    x = points.float()
    x = x - x.mean(0)  # centred: smaller norms, less cancellation in the fast distances
    n = len(x)
    if n <= k:
        raise ValueError(f"{k} nearest neighbours need at least {k + 1} distinct points, got {n}")
    rows = torch.arange(n, device=x.device) if rows is None else torch.as_tensor(rows, device=x.device)
    num_candidates = min(n - 1, k + 8)  # slack for the float32 rounding of the fast distances
    sq = x.pow(2).sum(1)
    out = []
    for i in range(0, len(rows), block_size):
        r = rows[i : i + block_size]
        xr, best_d, best_i = x[r], None, None
        for j in range(0, n, block_size):
            cols = torch.arange(j, min(j + block_size, n), device=x.device)
            d = sq[r, None] - 2.0 * (xr @ x[cols].t()) + sq[None, cols]  # (rows, cols)
            d = d.masked_fill(r[:, None] == cols[None, :], float("inf"))  # never its own neighbour
            idx = cols.expand(len(r), -1)
            if best_d is not None:
                d, idx = torch.cat([best_d, d], 1), torch.cat([best_i, idx], 1)
            best_d, pos = torch.topk(d, min(num_candidates, d.shape[1]), dim=1, largest=False)
            best_i = idx.gather(1, pos)
        exact = torch.empty(best_i.shape, dtype=torch.float64, device=x.device)
        step = max(1, 2**25 // (best_i.shape[1] * x.shape[1]))  # (step, candidates, D) float64 at a time
        for a in range(0, len(r), step):
            diff = x[best_i[a : a + step]].double() - xr[a : a + step, None].double()
            exact[a : a + step] = diff.pow(2).sum(-1).sqrt()
        out.append(exact.sort(1).values[:, :k])
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.float64, device=x.device)


def mle_intrinsic_dimension(dists, k=MLE_NEIGHBOURS):
    """Levina and Bickel (2005) with MacKay and Ghahramani's (2005) averaging: per point
    1 / m_k(x) = 1 / (k - 1) sum_{j < k} log(T_k(x) / T_j(x)) (T_j: distance to the j-th neighbour);
    the estimate is the inverse of the mean of these inverses (not the mean of the m_k(x)).
    dists: (N, >= k) ascending neighbour distances."""
    if k < 2 or dists.shape[1] < k:
        raise ValueError(f"MLE with k={k} needs k >= 2 and {k} neighbour distances per point")
    T = dists[:, :k].double()
    inverse = torch.log(T[:, k - 1 : k] / T[:, : k - 1]).sum(1) / (k - 1)
    return float(1.0 / inverse.mean())


def twonn_intrinsic_dimension(dists, discard=TWONN_DISCARD):
    """TwoNN (Facco et al. 2017): mu = r2 / r1 is Pareto with exponent d, so -log(1 - F(mu)) = d log(mu).
    With mu sorted and F(mu_(i)) = i / N, d is the least-squares slope through the origin over the
    (1 - discard) fraction of smallest mu. dists: (N, >= 2) ascending neighbour distances."""
    mu = (dists[:, 1].double() / dists[:, 0].double()).sort().values
    n = len(mu)
    keep = int(math.floor(n * (1.0 - discard)))
    if keep < 2:
        raise ValueError(f"TwoNN needs more points (got {n})")
    F_emp = torch.arange(1, keep + 1, dtype=torch.float64, device=mu.device) / n
    lx, ly = torch.log(mu[:keep]), -torch.log1p(-F_emp)
    return float((lx * ly).sum() / (lx * lx).sum())


def intrinsic_dimension(points, k=MLE_NEIGHBOURS, block_size=KNN_BLOCK):
    """Both estimators on one process: {"mle", "twonn", "num_points" (distinct), "duplicates"}."""
    unique, duplicates = unique_points(points)
    dists = knn_distances(unique, max(k, 2), block_size=block_size)
    return {"mle": mle_intrinsic_dimension(dists, k), "twonn": twonn_intrinsic_dimension(dists),
            "num_points": len(unique), "duplicates": duplicates}


# ----------------------------------------------------------------------------- autoencoder analysis: data, latents, figures
# E(x) everywhere below (equivariance error, intrinsic dimension, PCA, latent transforms) is the
# posterior mean of a KL model and the pre-quantization features of a VQ model (`encode_features`,
# where EQ-VAE applies tau, Sec. 3.3); D(z) quantizes first for a VQ model.

LATENT_SCALES = (0.75, 0.5, 0.25)  # Figure 3's latent scalings; its rotations are models.EQ_EVAL_ROTATIONS
FIGURE_SCALE, FIGURE_QUARTER_TURNS = 0.5, 1  # Figure 2: s = 0.5, and a pi/2 rotation


class AEImages(torch.utils.data.Dataset):
    """Validation images for the autoencoder analysis; items ((3, S, S) float in [-1, 1], index).

    protocol "ours": ADM's center crop (data.py), the crop every other stage of this codebase uses.
    protocol "eqvae": the official eval's torchvision pipeline: ToTensor, Resize(S) (bilinear on the
    tensor; `resize_antialias`, torchvision's default since 0.17), CenterCrop(S).
    """

    def __init__(self, data_path, image_size, protocol="ours", resize_antialias=True):
        # an image that breaks while reading stops the run with its name: skipping it would count
        # the next image twice
        self.dataset = make_dataset(data_path, image_size, crop="adm" if protocol == "ours" else "none", skip_broken=False)
        self.image_size, self.protocol, self.resize_antialias = image_size, protocol, resize_antialias

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            x, _ = self.dataset[index]
        except RuntimeError as e:  # an unreadable image, named
            raise InputError(str(e)) from None
        if self.protocol == "eqvae":
            from torchvision.transforms import InterpolationMode
            from torchvision.transforms import functional as TF

            x = (x + 1.0) / 2.0  # ToTensor's [0, 1]
            x = TF.resize(x, self.image_size, interpolation=InterpolationMode.BILINEAR, antialias=self.resize_antialias)
            x = TF.center_crop(x, self.image_size) * 2.0 - 1.0  # Normalize(0.5, 0.5)
        return x, index


def subset_indices(n, num_images=None, seed=0):
    """The images evaluated: all n, or a seeded random subset of num_images, sorted; the same on
    every rank and for any number of ranks."""
    if num_images is None or num_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=num_images, replace=False))


def rank_shard(indices):
    """This rank's contiguous share of `indices` (as extract_features splits its images)."""
    rank, world = rank_and_world()
    per = -(-len(indices) // world)
    return indices[rank * per : (rank + 1) * per]


def _shard_counts(n):
    """How many of n items each rank's rank_shard holds (rank order)."""
    world = rank_and_world()[1]
    per = -(-n // world)
    return [max(0, min(n, (r + 1) * per) - min(n, r * per)) for r in range(world)]


def ae_encode(ae, x, seeds=None):
    """E(x): the posterior mean (KL) or pre-quantization features (VQ). With `seeds` (one int per
    image), a KL posterior sample instead, its noise drawn from each image's own seed so that it
    does not depend on the batch or the number of ranks."""
    if ae.kind == "vq":
        return ae.encode_features(x).float()
    posterior = ae.encode(x)
    if seeds is None:
        return posterior.mean.float()
    shape = posterior.mean.shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return (posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)).float()


def ae_decode(ae, z):
    """D(z), after the nearest-codebook quantization for a VQ model (tau acts before it, Sec. 3.3)."""
    return ae.decode_features(z).float()


def figure3_transforms(lat):
    """Figure 3's tau on a lat x lat latent: (name, EqTransform) for s = 0.75, 0.5, 0.25, then the rotations."""
    out = [(f"scale_{s}", models.eq_transform(lat, lat, scale=s)) for s in LATENT_SCALES]
    return out + [(f"rot_{90 * k}", models.eq_transform(lat, lat, k=k)) for k in models.EQ_EVAL_ROTATIONS]


def realised_scales(lat):
    """The scales T_s takes on a lat x lat latent: tau resizes to whole latent pixels (models.eq_transform)."""
    return [round(models.eq_transform(lat, lat, scale=s).new_h / lat, 4) for s in models.EQ_EVAL_SCALES]


def equivariance_errors(ae, x, interp="bicubic", antialias=False):
    """App. C.3 per image, {"rotation": (N,), "scale": (N,)} float64: models.equivariance_error over
    T_r = {pi/2, pi, 3pi/2} and T_s = {0.25, 0.5, 0.75} (models.eval_transforms)."""
    lat_h, lat_w = x.shape[-2] // ae.downsample_factor, x.shape[-1] // ae.downsample_factor
    return {kind: models.equivariance_error(ae, x, models.eval_transforms(lat_h, lat_w, kind), interp, antialias).double().cpu()
            for kind in ("rotation", "scale")}


def pca_rgb(latents):
    """Figure 1 (left): the top three principal components of latent pixels as RGB.

    latents (N, C, h, w) of one autoencoder; the PCA is fitted over all N*h*w latent pixels (vectors
    of C channels); each component's sign is fixed (largest loading positive) so colours are
    reproducible, then min-max normalised over those pixels. Returns (N, 3, h, w) in [0, 1]."""
    N, C, h, w = latents.shape
    X = latents.permute(0, 2, 3, 1).reshape(-1, C).double()  # (N*h*w, C)
    X = X - X.mean(0)
    _, vectors = torch.linalg.eigh(X.t() @ X)  # ascending eigenvalues
    V = vectors.flip(1)[:, :3]  # (C, <= 3) top components
    V = V * torch.sign(V.gather(0, V.abs().argmax(0, keepdim=True)))
    P = X @ V
    if P.shape[1] < 3:  # fewer than 3 latent channels: black in the missing colours
        P = torch.cat([P, P.new_zeros(len(P), 3 - P.shape[1])], 1)
    lo, hi = P.amin(0), P.amax(0)
    P = (P - lo) / (hi - lo).clamp_min(1e-12)
    return P.reshape(N, h, w, 3).permute(0, 3, 1, 2).float()


def vae_labels(specs):
    """Short column/row names for --vae specs: the file or folder name; numbered when two collide."""
    names = [os.path.basename(s.rstrip("/")) or s for s in specs]
    return [f"{i + 1}:{n}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def format_table(header, rows):
    """Plain text table: floats with 4 decimals, None as n/a, infinities as inf."""
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.4f}"
        return str(v)

    table = [header] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table)


# ----------------------------------------------------------------------------- subcommands


def _few_images_note(n, what):
    if n < 2:
        raise InputError(f"{what} has {n} image(s): FID needs at least 2 (and 50000 to compare with published numbers)")
    if n < MIN_FULL_RANK:
        return (f"{what} has {n} images, fewer than {MIN_FULL_RANK}: its covariance is rank-deficient, so FID/sFID are "
                f"computed but NOT comparable with published numbers (ADM protocol: 50000 samples)")
    return None


def stored_sample_statistics(images):
    """The stored FID/sFID statistics of a sample .npz (`npz_statistics`: used as ADM uses them, or
    {} for "compute them from the images") and the notes on them; raises InputError when the images
    cannot give what is computed from them."""
    given, notes = {}, []
    if isinstance(images, NpzImages):
        given, notes = npz_statistics(images.path, f"sample {images.source}")
    if not given:
        return given, notes + [n for n in [_few_images_note(len(images), f"sample {images.source}")] if n]
    if len(images) == 0:
        raise InputError(f"sample {images.source} has no images in arr_0: IS and precision/recall need them")
    which = "FID and sFID statistics" if "mu_s" in given else "FID statistics"
    notes.append(f"sample {images.source} stores mu/sigma: its {which} are the file's, as ADM's evaluator takes them, "
                 f"not those of its {len(images)} images (which give IS and precision/recall)")
    return given, notes


def evaluate_generation(model, ref, sample, batch_size=64, num_workers=4, image_size=None, sqrtm="scipy", use_cache=True):
    """FID, sFID, IS, precision and recall of `sample` against `ref` (each an ADM .npz, a folder or
    builtin:shapes; `sample` may also be a dataset from open_images). Statistics stored in either
    .npz are used as ADM uses them (`npz_statistics`). Every rank must call it; rank 0 returns
    (metrics, notes), the others (None, notes). Raises InputError on bad input before any Inception
    pass over the samples."""
    sample_images = open_images(sample, image_size) if isinstance(sample, str) else sample
    sample_given, notes = stored_sample_statistics(sample_images)
    reference = reference_batch(ref, model, batch_size, num_workers, image_size, use_cache)
    notes += reference["notes"]
    if reference["stats_from"] == "images":
        notes.append(_few_images_note(reference["num_images"], f"reference {ref}"))
    if reference["image_size"] is not None and reference["image_size"] != sample_images.image_size:
        notes.append(f"reference images are {reference['image_size']} pixels but samples are {sample_images.image_size}: "
                     f"both are resized to 299, but such scores are not what papers report")
    features, stats = extract_features(
        model, sample_images, batch_size, num_workers, keep=("pool",), stats=() if sample_given else ("pool", "spatial"),
        desc="samples",
    )
    notes = [n for n in notes if n]
    if not is_main():
        return None, notes
    pool = features["pool"]
    if sample_given:
        sample_stats = sample_given
    else:
        (mu, sigma), (mu_s, sigma_s) = stats["pool"], stats["spatial"]
        sample_stats = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    metrics = dict(fid=None, sfid=None, precision=None, recall=None)
    s, r = sample_stats, reference
    metrics["fid"] = frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"], method=sqrtm)
    if "mu_s" in s and r["mu_s"] is not None:  # else a note from npz_statistics says why not
        metrics["sfid"] = frechet_distance(s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"], method=sqrtm)
    metrics["is"] = inception_score(inception_probs(pool, model.fc.weight.detach(), device=model.fc.weight.device))
    if reference["pool"] is not None and min(len(reference["pool"]), len(pool)) > PR_NEIGHBOURS:
        device = next(model.parameters()).device
        metrics["precision"], metrics["recall"] = precision_recall(reference["pool"], pool, device=device)
    else:
        notes.append(f"precision/recall need at least {PR_NEIGHBOURS + 1} reference images and samples: not computed")
    metrics.update(
        num_images=len(sample_images),
        num_ref_images=reference["num_images"],
        sample_statistics=_statistics_source("file" if sample_given else "images", len(sample_images), "mu_s" in sample_stats),
        ref_statistics=_statistics_source(reference["stats_from"], reference["num_images"], reference["mu_s"] is not None),
        ref_feature_cache=reference["cache"],
    )
    return metrics, notes


def check_out(out):
    """Where the result goes must be writable before the long work starts, or the result is lost."""
    if os.path.isdir(out):
        fail(f"--out {out} is a folder: give a file name for the result, e.g. {os.path.join(out, 'result.json')}")
    blocked = unwritable_ancestor(os.path.dirname(os.path.abspath(out)))
    if blocked:
        fail(f"{out}: {blocked} is not writable: pass --out with a writable place for the result")


def _default_out(sample):
    name = sample.rstrip("/")
    if name.startswith("builtin:"):
        name = name.replace(":", "-")
    return (os.path.splitext(name)[0] if name.endswith(".npz") else name) + ".metrics.json"


def cmd_gen(args, device):
    t0 = time.time()
    try:  # bad samples are refused before the weights load
        sample_images = open_images(args.sample, args.image_size)
        stored_sample_statistics(sample_images)
    except InputError as e:
        fail(str(e))
    if not args.ref.startswith("builtin:") and not os.path.exists(args.ref):
        fail(f"--ref {args.ref} does not exist: give an ADM reference batch .npz (or build one with `evaluate.py ref`)")
    out = args.out or _default_out(args.sample)
    check_out(out)
    model = _load_model(args, device)
    try:
        metrics, notes = evaluate_generation(
            model, args.ref, sample_images, args.batch_size, args.num_workers, args.image_size, args.sqrtm, args.cache
        )
    except InputError as e:
        fail(str(e))
    if not is_main():
        return
    if not model.info["comparable"]:
        notes.insert(0, RANDOM_WARNING)
    result = {
        **metrics,
        "ref": args.ref,
        "sample": args.sample,
        "inception_weights": model.info["weights"],
        "inception_id": model.info["id"],
        "comparable_with_papers": model.info["comparable"] and not any("NOT comparable" in n for n in notes),
        "precision_mode": args.precision,
        "sqrtm": args.sqrtm,
        "world_size": rank_and_world()[1],
        "notes": notes,
        "seconds": round(time.time() - t0, 1),
    }
    rows = [("FID", metrics["fid"]), ("sFID", metrics["sfid"]), ("Inception Score", metrics["is"]),
            ("Precision", metrics["precision"]), ("Recall", metrics["recall"])]
    lines = [f"{'metric':<16} value"] + [f"{name:<16} {'n/a' if v is None else f'{v:.4f}'}" for name, v in rows]
    lines += [f"{'samples':<16} {metrics['num_images']} images; FID/sFID statistics: {metrics['sample_statistics']}",
              f"{'reference':<16} {metrics['num_ref_images']} images; FID/sFID statistics: {metrics['ref_statistics']}",
              f"{'Inception':<16} {model.info['id']} ({args.precision})"]
    lines += [f"NOTE: {n}" for n in notes]
    print0("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, result)
    print0(f"wrote {out}")


def cmd_ref(args, device):
    """Build an ADM-format reference batch from an image folder: statistics over every image (ADM
    center crop at --image-size), arr_0/arr_1 = a seeded random subset of up to --num-ref-images
    images and their labels, for precision/recall."""
    if not args.out.endswith(".npz"):
        fail(f"--out {args.out}: a reference batch is an .npz file; end the name with .npz")
    if args.num_ref_images <= PR_NEIGHBOURS:
        fail(f"--num-ref-images {args.num_ref_images}: precision/recall need at least {PR_NEIGHBOURS + 1}")
    try:
        images = CroppedImages(args.data_path, args.image_size)
        note = _few_images_note(len(images), f"--data-path {args.data_path}")
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        fail(str(e))
    model = _load_model(args, device)
    n = len(images)
    subset = np.sort(np.random.default_rng(args.global_seed).choice(n, size=min(n, args.num_ref_images), replace=False))
    mask = np.zeros(n, dtype=bool)
    mask[subset] = True
    features, stats = extract_features(
        model, images, args.batch_size, args.num_workers, keep=("pool",), stats=("pool", "spatial"), keep_mask=mask, desc="reference"
    )
    if not is_main():
        return
    # arr_0: rank 0 decodes the subset again, cheaper than gathering up to 10k images across ranks
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images.dataset, subset.tolist()),
                                         batch_size=args.batch_size, num_workers=args.num_workers)
    arr, labels = [], []
    for x, y in tqdm(loader, desc="arr_0", unit="batch", dynamic_ncols=True):
        arr.append(((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))  # (B, H, W, 3)
        labels.append(y)
    arr, labels = torch.cat(arr).numpy(), torch.cat(labels).numpy().astype(np.int64)
    (mu, sigma), (mu_s, sigma_s) = stats["pool"], stats["spatial"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    _save_npz_atomic(args.out, arr_0=arr, arr_1=labels, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    # the subset's pool features are known already: seed the cache that `gen` would build
    _save_npz_atomic(_cache_path(args.out, _features_key(args.out, model)), pool=features["pool"])
    for msg in ([RANDOM_WARNING] if not model.info["comparable"] else []) + ([note] if note else []):
        print0(f"NOTE: {msg}")
    print0(f"wrote {args.out}: statistics over {n} images, arr_0 {tuple(arr.shape)} uint8 for precision/recall")


def _load_model(args, device):
    try:
        return load_inception(args.inception_weights, device, args.precision)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        fail(str(e))


# ----------------------------------------------------------------------------- autoencoder subcommands


def _few_images_for_tables(n):
    """equiv and id: (comparable, note). The paper's tables use the 50k ImageNet validation images;
    below MIN_FULL_RANK images the estimates (the intrinsic dimension above all) are too noisy to
    set beside them."""
    if n >= MIN_FULL_RANK:
        return True, None
    return False, (f"{n} images, fewer than {MIN_FULL_RANK}: computed, but NOT comparable with the paper's numbers "
                   f"(50000 ImageNet validation images)")


def _ae_setup(args, device, protocol="ours", resize_antialias=True):
    """What every autoencoder subcommand starts with: checks, the images, the subset, the autoencoders."""
    if args.precision == "tf32" and device.type != "cuda":
        fail("--precision tf32 only exists on CUDA devices: use fp32 (or bf16) on CPU")
    if args.num_images is not None and args.num_images < 1:
        fail(f"--num-images {args.num_images}: give a positive number (or leave it out for every image)")
    try:
        dataset = AEImages(args.data_path, args.image_size, protocol, resize_antialias)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        fail(str(e))
    indices = subset_indices(len(dataset), args.num_images, args.seed)
    aes = []
    for spec in args.vae:
        torch.manual_seed(args.seed)  # scratch:CONFIG draws from the global RNG: the same weights on every rank
        try:
            ae = models.load_autoencoder(spec, args.trust_checkpoint)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            fail(f"--vae {spec}: {e}")
        if args.image_size % ae.downsample_factor:
            fail(f"--image-size {args.image_size} is not a multiple of {spec}'s downsampling factor {ae.downsample_factor}")
        aes.append(ae.to(device).eval().requires_grad_(False))
    notes = []
    skipped = getattr(dataset.dataset, "skipped", [])  # unreadable files found while listing the folder
    if skipped:
        notes.append(f"{len(skipped)} unreadable image(s) left out: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}")
    if args.num_images is not None and args.num_images > len(dataset):
        notes.append(f"--num-images {args.num_images} but {args.data_path} has {len(dataset)} images: all are used")
    return dataset, indices, aes, notes


def _ae_loader(dataset, indices, args, device):
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, rank_shard(indices).tolist()), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, pin_memory=device.type == "cuda",
    )


def _progress(indices, desc):
    return tqdm(total=len(rank_shard(indices)), desc=desc, unit="img", disable=not is_main(), dynamic_ncols=True)


def _all_reduce_sum(t):
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t


def _ae_output(args, command, result, header, table_rows, notes, t0):
    """Rank 0: print the table and notes, write the JSON (default results/COMMAND.json)."""
    result.update(command=command, vae=args.vae, data_path=args.data_path, image_size=args.image_size, seed=args.seed,
                  precision=args.precision, world_size=rank_and_world()[1], notes=notes, seconds=round(time.time() - t0, 1))
    out = args.out or os.path.join("results", f"{command}.json")
    print0(format_table(header, table_rows))
    for n in notes:
        print0(f"NOTE: {n}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, result)
    print0(f"wrote {out}")


@torch.no_grad()
def evaluate_reconstruction(aes, inception, dataset, indices, args, device, lpips_net=None):
    """rFID, PSNR, SSIM, LPIPS of every autoencoder on the same images, and with latent_transform
    Figure 3's rFID between tau x and D(tau E(x)). Every rank must call it: each reconstructs its
    shard, the Inception features or statistics and the metric sums are combined across ranks, the
    Frechet distances shared out; rank 0 returns the rows (the others None)."""
    pipeline = "pytorch-fid" if args.protocol == "eqvae" else "adm"
    image_side = lambda ae, t: t.new_h * ae.downsample_factor  # noqa: E731
    plans = [figure3_transforms(args.image_size // ae.downsample_factor) if args.latent_transform else [] for ae in aes]
    # One feature set per image set, each key made on every rank before the loop (a rank may get no
    # images). Up to POOL_DIM images the pool features are kept and FID takes the exact low-rank form
    # (no 2048x2048 eigendecompositions); beyond, running mean and covariance as `gen` does.
    few = len(indices) <= POOL_DIM
    new_set = lambda: [] if few else RunningStats(POOL_DIM, device)  # noqa: E731
    sets = {"x": new_set()}
    for i, (ae, plan) in enumerate(zip(aes, plans)):
        sets[(i, "recon")] = new_set()
        for name, t in plan:
            sets[(i, name)] = new_set()
            sets.setdefault(("tau x", t.k, image_side(ae, t)), new_set())
    sums = torch.zeros(len(aes), 5, dtype=torch.float64)  # psnr, ssim, lpips, images, exact reconstructions

    def add(key, images):  # (N, 3, H, W) in [-1, 1] -> Inception pool features of their uint8 version
        pool = inception_features(inception, models.to_uint8(images).permute(0, 2, 3, 1), pipeline)["pool"]
        if few:
            sets[key].append(pool.cpu())
        else:
            sets[key].update(pool)

    bar = _progress(indices, "recon")
    for x, index in _ae_loader(dataset, indices, args, device):
        x = x.to(device)
        add("x", x)
        done = set()
        seeds = (args.seed * 1_000_003 + index).tolist() if args.protocol == "eqvae" else None  # posterior noise per image
        for i, (ae, plan) in enumerate(zip(aes, plans)):
            with _precision_context(args.precision, device):
                z = ae_encode(ae, x, seeds)
                rec = ae_decode(ae, z)
            add((i, "recon"), rec)
            m = reconstruction_metrics(x, rec, args.protocol, lpips_net)
            sums[i] += torch.tensor([m["psnr"].sum(), m["ssim"].sum(), m["lpips"].sum() if "lpips" in m else 0.0,
                                     len(x), torch.isinf(m["psnr"]).sum()], dtype=torch.float64)
            for name, t in plan:  # Figure 3: tau x against D(tau E(x))
                tau = lambda v: models.apply_eq_transform(v, t, args.interp, args.antialias)  # noqa: E731
                key = ("tau x", t.k, image_side(ae, t))
                if key not in done:  # autoencoders with the same image transform share tau x
                    add(key, tau(x))
                    done.add(key)
                with _precision_context(args.precision, device):
                    add((i, name), ae_decode(ae, tau(z)))
        bar.update(len(x))
    bar.close()
    if few:
        counts = _shard_counts(len(indices))
        sets = {k: _gather_rows(torch.cat(v) if v else torch.zeros(0, POOL_DIM), counts, device).numpy() for k, v in sets.items()}
    else:
        sets = {k: v.all_reduce().finalize() for k, v in sets.items()}
    sums = _all_reduce_sum(sums.to(device)).cpu()

    # The Frechet distances (seconds each at 2048-d) are shared out across ranks, then gathered.
    jobs = [((i, "recon"), "x") for i in range(len(aes))]
    jobs += [((i, name), ("tau x", t.k, image_side(ae, t))) for i, (ae, plan) in enumerate(zip(aes, plans)) for name, t in plan]
    rank, world = rank_and_world()
    fids = {}
    for j, (key, ref) in enumerate(jobs):
        if j % world == rank:
            fids[key] = (frechet_distance_from_features(sets[key], sets[ref]) if few
                         else frechet_distance(*sets[key], *sets[ref], method=args.sqrtm))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, fids)
        fids = {k: v for part in parts for k, v in part.items()}
    if not is_main():
        return None
    rows = []
    for i, (ae, plan) in enumerate(zip(aes, plans)):
        psnr_sum, ssim_sum, lpips_sum, n, exact = sums[i].tolist()
        row = {"vae": args.vae[i], "kind": ae.kind, "downsample_factor": ae.downsample_factor,
               "latent_shape": [ae.latent_channels, args.image_size // ae.downsample_factor, args.image_size // ae.downsample_factor],
               "rfid": fids[(i, "recon")], "psnr": psnr_sum / n, "ssim": ssim_sum / n,
               "lpips": lpips_sum / n if lpips_net is not None else None, "exact_reconstructions": int(exact)}
        if plan:
            latent = {name: fids[(i, name)] for name, _ in plan}
            latent["rot_mean"] = float(np.mean([latent[f"rot_{90 * k}"] for k in models.EQ_EVAL_ROTATIONS]))
            row["rfid_latent_transform"] = latent
        rows.append(row)
    return rows


def cmd_recon(args, device):
    t0 = time.time()
    if args.resize_antialias is not None and args.protocol != "eqvae":
        fail("--resize-antialias only applies to --protocol eqvae (ours uses ADM's center crop)")
    resize_antialias = True if args.resize_antialias is None else args.resize_antialias
    window = len(ssim_window())
    if args.image_size < window:
        fail(f"--image-size {args.image_size}: SSIM's {window}x{window} window needs images of at least {window} px")
    if args.lpips and args.image_size < 16:  # VGG's four poolings
        fail(f"--image-size {args.image_size}: LPIPS-VGG needs images of at least 16 px; add --no-lpips")
    dataset, indices, aes, notes = _ae_setup(args, device, args.protocol, resize_antialias)
    try:
        notes.append(_few_images_note(len(indices), f"{args.data_path} ({len(indices)} images evaluated)"))
    except InputError as e:
        fail(str(e))
    inception = _load_model(args, device)
    lpips_net = None
    if args.lpips:
        torch.manual_seed(0)  # a random backbone is then the same function on every rank and in every run
        try:
            lpips_net = models.load_lpips(args.lpips_random).to(device)
        except RuntimeError as e:
            fail(str(e))
    rows = evaluate_reconstruction(aes, inception, dataset, indices, args, device, lpips_net)
    if not is_main():
        return
    if not inception.info["comparable"]:
        notes.insert(0, RANDOM_WARNING)
    if lpips_net is not None and args.lpips_random:
        notes.insert(0, LPIPS_RANDOM_WARNING)
    if args.protocol == "eqvae" and any(ae.kind == "vq" for ae in aes):
        notes.append("--protocol eqvae samples the posterior of KL models only; VQ models reconstruct deterministically")
    for row in rows:
        if row["exact_reconstructions"]:
            notes.append(f"{row['vae']}: {row['exact_reconstructions']} image(s) reconstructed exactly (PSNR = inf), so the mean PSNR is inf")
    notes = [n for n in notes if n]
    header = ["vae", "kind", "rFID", "PSNR", "SSIM", "LPIPS"]
    table = [[r["vae"], r["kind"], r["rfid"], r["psnr"], r["ssim"], r["lpips"]] for r in rows]
    if args.latent_transform:
        header += [f"rFID s={s}" for s in LATENT_SCALES] + ["rFID rot"]
        for t, r in zip(table, rows):
            t += [r["rfid_latent_transform"][f"scale_{s}"] for s in LATENT_SCALES] + [r["rfid_latent_transform"]["rot_mean"]]
    result = {
        "rows": rows, "protocol": args.protocol, "num_images": len(indices),
        "crop": "ADM center crop" if args.protocol == "ours" else f"torchvision Resize (antialias={resize_antialias}) + CenterCrop",
        "latent": "posterior sample (KL), pre-quantization features (VQ)" if args.protocol == "eqvae"
                  else "posterior mean (KL), pre-quantization features (VQ)",
        "fid_pipeline": "pytorch-fid" if args.protocol == "eqvae" else "adm",
        "frechet": "low-rank form from the features" if len(indices) <= POOL_DIM else f"sqrtm {args.sqrtm}",
        "inception_weights": inception.info["weights"], "inception_id": inception.info["id"],
        "lpips_backbone": None if lpips_net is None else ("random" if args.lpips_random else "torchvision VGG16 ImageNet"),
        "latent_transform": {"interp": args.interp, "antialias": args.antialias, "scales": list(LATENT_SCALES),
                             "quarter_turns": list(models.EQ_EVAL_ROTATIONS)} if args.latent_transform else None,
    }
    result["comparable"] = (inception.info["comparable"] and not (lpips_net is not None and args.lpips_random)
                            and not any("NOT comparable" in n for n in notes))
    _ae_output(args, "recon", result, header, table, notes, t0)


@torch.no_grad()
def cmd_equiv(args, device):
    t0 = time.time()
    dataset, indices, aes, notes = _ae_setup(args, device)
    sums = torch.zeros(len(aes), 3, dtype=torch.float64)  # rotation, scale, images
    bar = _progress(indices, "equivariance")
    for x, _ in _ae_loader(dataset, indices, args, device):
        x = x.to(device)
        for i, ae in enumerate(aes):
            with _precision_context(args.precision, device):
                e = equivariance_errors(ae, x, args.interp, args.antialias)
            sums[i] += torch.tensor([e["rotation"].sum(), e["scale"].sum(), len(x)], dtype=torch.float64)
        bar.update(len(x))
    bar.close()
    sums = _all_reduce_sum(sums.to(device)).cpu()
    if not is_main():
        return
    rows = [{"vae": spec, "kind": ae.kind, "eq_error_rotation": s[0] / s[2], "eq_error_scale": s[1] / s[2],
             "scales_realised": realised_scales(args.image_size // ae.downsample_factor)}
            for spec, ae, s in zip(args.vae, aes, sums.tolist())]
    for row, ae in zip(rows, aes):  # tau moves whole latent pixels: a side not divisible by 4 rounds the scales
        if row["scales_realised"] != list(models.EQ_EVAL_SCALES):
            notes.append(f"{row['vae']}: its {args.image_size // ae.downsample_factor}-pixel latent side takes the "
                         f"scales {row['scales_realised']}, not {list(models.EQ_EVAL_SCALES)}")
    comparable, note = _few_images_for_tables(len(indices))
    notes += [note] if note else []
    result = {"rows": rows, "num_images": len(indices), "interp": args.interp, "antialias": args.antialias,
              "rotations": ["pi/2", "pi", "3pi/2"], "scales": list(models.EQ_EVAL_SCALES),
              "E": "posterior mean (KL), pre-quantization features (VQ)", "crop": "ADM center crop", "comparable": comparable}
    table = [[r["vae"], r["kind"], r["eq_error_rotation"], r["eq_error_scale"]] for r in rows]
    _ae_output(args, "equiv", result, ["vae", "kind", "Delta rotation", "Delta scale"], table, notes, t0)


@torch.no_grad()
def cmd_id(args, device):
    t0 = time.time()
    if args.mle_k < 2:
        fail(f"--mle-k {args.mle_k}: the MLE needs at least 2 neighbours")
    dataset, indices, aes, notes = _ae_setup(args, device)
    if len(indices) <= args.mle_k:
        fail(f"{len(indices)} images: the intrinsic dimension with --mle-k {args.mle_k} needs more than {args.mle_k}")
    local, hashes = [[] for _ in aes], [torch.zeros(0, dtype=torch.int64)]
    bar = _progress(indices, "latents")
    for x, _ in _ae_loader(dataset, indices, args, device):
        hashes.append(image_hashes(x))
        x = x.to(device)
        for i, ae in enumerate(aes):
            with _precision_context(args.precision, device):
                local[i].append(ae_encode(ae, x).flatten(1).cpu())  # (B, C*h*w)
        bar.update(len(x))
    bar.close()
    # each image once: the first of every set of identical images
    hashes = _gather_rows(torch.cat(hashes)[:, None], _shard_counts(len(indices)), device)[:, 0].numpy()
    keep = torch.from_numpy(np.sort(np.unique(hashes, return_index=True)[1]))
    if len(keep) < len(indices):
        notes.append(f"{len(indices) - len(keep)} duplicate image(s) dropped: each image counts once")
    rows = []
    for i, ae in enumerate(aes):
        dim = ae.latent_channels * (args.image_size // ae.downsample_factor) ** 2
        mine = torch.cat(local[i]) if local[i] else torch.zeros(0, dim)
        points = _gather_rows(mine, _shard_counts(len(indices)), device)[keep].to(device)  # every rank holds every latent ...
        points, duplicates = unique_points(points)
        if len(points) <= args.mle_k:
            fail(f"--vae {args.vae[i]}: only {len(points)} distinct latents, too few for --mle-k {args.mle_k}")
        # ... and finds the neighbours of its share of them
        shard = torch.from_numpy(rank_shard(np.arange(len(points))))
        dists = knn_distances(points, args.mle_k, rows=shard, block_size=args.knn_block)
        dists = _gather_rows(dists.cpu(), _shard_counts(len(points)), device)
        if is_main():
            rows.append({"vae": args.vae[i], "kind": ae.kind, "latent_dim": dim, "num_points": len(points),
                         "duplicate_images": len(indices) - len(keep), "duplicate_latents": duplicates,
                         "mle": mle_intrinsic_dimension(dists, args.mle_k),
                         "twonn": twonn_intrinsic_dimension(dists)})
            if duplicates:
                notes.append(f"{args.vae[i]}: {duplicates} identical latent(s) of different images dropped before the "
                             f"neighbour search")
        del points
    if not is_main():
        return
    comparable, note = _few_images_for_tables(len(indices))
    notes += [note] if note else []
    result = {"rows": rows, "num_images": len(indices), "mle_k": args.mle_k, "twonn_discard": TWONN_DISCARD,
              "E": "posterior mean (KL), pre-quantization features (VQ), flattened", "crop": "ADM center crop",
              "comparable": comparable}
    table = [[r["vae"], r["kind"], r["latent_dim"], r["mle"], r["twonn"]] for r in rows]
    _ae_output(args, "id", result, ["vae", "kind", "dim", f"ID MLE (k={args.mle_k})", "ID TwoNN"], table, notes, t0)


@torch.no_grad()
def cmd_figures(args, device):
    """Figure 1 (left) and Figure 2 as PNG files: a few images, so rank 0 alone draws them."""
    dataset, indices, aes, notes = _ae_setup(args, device)
    if not is_main():
        return
    os.makedirs(args.out, exist_ok=True)
    x = torch.stack([dataset[int(i)][0] for i in indices]).to(device)  # (N, 3, S, S)
    S, names = args.image_size, vae_labels(args.vae)
    show = lambda v: ((v.float() + 1) / 2).clamp(0, 1)  # noqa: E731
    enlarge = lambda v: F.interpolate(v, size=(S, S), mode="nearest") if v.shape[-1] != S else v  # noqa: E731

    def batched(fn):  # fn over x in chunks of --batch-size (a figure of many images must not exhaust memory)
        with _precision_context(args.precision, device):
            return torch.cat([fn(chunk) for chunk in x.split(args.batch_size)])

    written = {}

    # Figure 1 (left): input | top-3 PCA of E(x) per autoencoder, PCA fitted over all these images' latent pixels
    columns = [show(x)]
    columns += [enlarge(pca_rgb(batched(lambda v, ae=ae: ae_encode(ae, v)))) for ae in aes]
    labels = ["input"] + [f"{n}\nPCA of E(x)" for n in names]
    save_labelled_grid(columns, labels, os.path.join(args.out, "figure1_latent_pca.png"))
    written["figure1_latent_pca.png"] = labels

    # Figure 2: x | tau x | per autoencoder D(E(tau x)) and D(tau E(x)); smaller outputs enlarged (nearest).
    # tau moves whole latent pixels, so autoencoders of other factors can realise another image tau
    # (s = 0.5 of a 5-pixel latent is 0.4): each new one gets its own tau x column.
    for fname, kw in ((f"figure2_scale{FIGURE_SCALE}.png", dict(scale=FIGURE_SCALE)),
                      (f"figure2_rotation{90 * FIGURE_QUARTER_TURNS}.png", dict(k=FIGURE_QUARTER_TURNS))):
        columns, labels, drawn = [show(x)], ["x"], set()
        for ae, name in zip(aes, names):
            lat = S // ae.downsample_factor
            t = models.eq_transform(lat, lat, **kw)
            tau = lambda v: models.apply_eq_transform(v, t, args.interp, args.antialias)  # noqa: E731
            side = t.new_h * ae.downsample_factor
            if side not in drawn:
                columns.append(enlarge(show(tau(x))))
                labels.append("tau x" if not drawn else f"tau x\n{side} px, for {name}")
                drawn.add(side)
            columns += [enlarge(show(batched(lambda v, ae=ae, tau=tau: ae_decode(ae, ae_encode(ae, tau(v)))))),
                        enlarge(show(batched(lambda v, ae=ae, tau=tau: ae_decode(ae, tau(ae_encode(ae, v))))))]
            labels += [f"{name}\nD(E(tau x))", f"{name}\nD(tau E(x))"]
        save_labelled_grid(columns, labels, os.path.join(args.out, fname))
        written[fname] = labels
    info = {"figures": {k: {"columns": [c.replace("\n", ": ") for c in v]} for k, v in written.items()},
            "image_indices": indices.tolist(), "vae": args.vae, "data_path": args.data_path, "image_size": S,
            "interp": args.interp, "antialias": args.antialias, "figure2_scale": FIGURE_SCALE,
            "figure2_rotation": f"{FIGURE_QUARTER_TURNS} x pi/2", "notes": notes}
    write_json(os.path.join(args.out, "figures.json"), info)
    for n in notes:
        print0(f"NOTE: {n}")
    print0("\n".join(f"wrote {os.path.join(args.out, k)}: {', '.join(c.replace(chr(10), ' ') for c in v)}" for k, v in written.items()))


def main(args):
    rank, world_size, device = setup_distributed()
    # the result's place is checked before the long work (gen checks its default, next to the sample)
    if args.command == "figures":
        if os.path.isfile(args.out):
            fail(f"--out {args.out} is a file: figures writes a folder of PNGs; pass a folder")
        blocked = unwritable_ancestor(args.out)
        if blocked:
            fail(f"--out {args.out}: {blocked} is not writable: pass --out with a writable folder")
    elif args.command != "gen":
        check_out(args.out or os.path.join("results", f"{args.command}.json"))
    try:
        {"gen": cmd_gen, "ref": cmd_ref, "recon": cmd_recon, "equiv": cmd_equiv, "id": cmd_id,
         "figures": cmd_figures}[args.command](args, device)
    except InputError as e:  # raised while reading; from a DataLoader worker it comes wrapped in its traceback
        fail(str(e).strip().splitlines()[-1].split("InputError: ", 1)[-1])
    finally:
        cleanup()


# ----------------------------------------------------------------------------- parser

PRESETS = {"tiny": dict(batch_size=8, num_workers=0)}
DEFAULTS = dict(batch_size=64, num_workers=4)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def inception_flags(p):
        p.add_argument("--inception-weights", default=INCEPTION_WEIGHTS,
                       help=f"pytorch-fid's Inception weights: a path, the name {INCEPTION_WEIGHTS} (downloaded once "
                            f"into $EQVAE_CACHE), or `random` for offline smoke runs (numbers then not comparable)")

    def loader_flags(p, what="Inception forward"):
        p.add_argument("--per-proc-batch-size", "--batch-size", dest="batch_size", type=int, default=None,
                       help=f"images per {what}, per process (default 64)")
        p.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes per process (default 4)")
        p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="tiny: batch 8, no workers (CPU smoke runs)")

    def common(p):
        # shared by the generation subcommands (gen, ref)
        inception_flags(p)
        p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                       help="Inception arithmetic: fp32 (TF32 off; the reference), tf32 (CUDA) or bf16 autocast; "
                            "see `python bench.py --only inception` for their error against fp32")
        loader_flags(p)

    def ae_flags(p, num_images=None):
        # shared by the autoencoder subcommands (recon, equiv, id, figures)
        p.add_argument("--vae", action="append", required=True, metavar="SPEC",
                       help="an autoencoder: a name (" + ", ".join(sorted(models.PRETRAINED_AUTOENCODERS)) + "), "
                            "scratch:CONFIG, a diffusers folder or a checkpoint file; repeat the flag to compare several side by side")
        p.add_argument("--trust-checkpoint", action=argparse.BooleanOptionalAction, default=False,
                       help="allow full unpickling of --vae checkpoints that need it (only for files you trust)")
        p.add_argument("--data-path", required=True,
                       help="validation images: a folder (class subfolders or flat; the paper: the 50k ImageNet "
                            "validation images) or builtin:shapes[:N[:SEED]]")
        p.add_argument("--image-size", type=int, default=256, help="pixels of the square crop (the paper: 256)")
        p.add_argument("--num-images", type=int, default=num_images,
                       help="evaluate a seeded random subset of this many images (default: " +
                            ("all" if num_images is None else str(num_images)) + ")")
        p.add_argument("--global-seed", "--seed", dest="seed", type=int, default=0,
                       help="seed of the --num-images subset (and, for recon --protocol eqvae, of the posterior noise)")
        p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                       help="arithmetic of the autoencoders (and of recon's Inception): fp32 (the reference), "
                            "tf32 (CUDA) or bf16 autocast")
        loader_flags(p, "autoencoder (and Inception) forward")

    def tau_flags(p):
        p.add_argument("--interp", default="bicubic", choices=models.INTERPOLATIONS,
                       help="resampling of the scale transforms tau on images and latents (the paper: bicubic)")
        p.add_argument("--antialias", action=argparse.BooleanOptionalAction, default=False,
                       help="low-pass filter bilinear/bicubic downscaling in tau (not in the paper)")

    gen = sub.add_parser("gen", help="FID, sFID, IS, precision, recall of a sample batch against a reference batch")
    gen.add_argument("--ref", required=True,
                     help="reference: ADM reference batch .npz (arr_0 + optional mu, sigma, mu_s, sigma_s), image folder or builtin:shapes")
    gen.add_argument("--sample", required=True,
                     help="samples: ADM .npz (arr_0 uint8 NHWC; its mu, sigma, mu_s, sigma_s, if any, give FID/sFID as in ADM), "
                          "folder of same-size images, or builtin:shapes")
    gen.add_argument("--image-size", type=int, default=None, help="pixels; only for builtin:shapes sources")
    gen.add_argument("--out", default=None, help="JSON file for the metrics (default: next to the sample, SAMPLE.metrics.json)")
    gen.add_argument("--sqrtm", default="scipy", choices=["scipy", "eigh"],
                     help="matrix square root in the Frechet distance: scipy (ADM's, ~13 s at 2048-d on 2 cores) or "
                          "eigh (symmetric eigendecomposition, ~5x faster, equal to ~1e-10 relative)")
    gen.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                     help="cache a reference .npz's features next to it (REF.features-HASH.npz)")
    common(gen)

    ref = sub.add_parser("ref", help="build an ADM-format reference batch (.npz) from an image folder")
    ref.add_argument("--data-path", required=True, help="image folder (class subfolders or flat) or builtin:shapes[:N[:SEED]]")
    ref.add_argument("--image-size", type=int, default=256, help="pixels of ADM's center crop (the paper: 256)")
    ref.add_argument("--out", required=True, help="output .npz (arr_0, arr_1, mu, sigma, mu_s, sigma_s)")
    ref.add_argument("--num-ref-images", type=int, default=REF_PR_IMAGES,
                     help="images kept in arr_0 for precision/recall (ADM: 10000); statistics use all images")
    ref.add_argument("--global-seed", type=int, default=0, help="seed of the arr_0 subset")
    common(ref)

    recon = sub.add_parser("recon", help="rFID, PSNR, SSIM, LPIPS of autoencoders (Tables 1, 12); Figure 3 with --latent-transform")
    ae_flags(recon)
    recon.add_argument("--protocol", default="ours", choices=AE_PROTOCOLS,
                       help="ours: ADM center crop, posterior mean, metrics on uint8 images, ADM's Inception input; "
                            "eqvae: the official EQ-VAE eval's conventions (see the README), to compare with published numbers")
    recon.add_argument("--resize-antialias", action=argparse.BooleanOptionalAction, default=None,
                       help="--protocol eqvae only: antialias in torchvision's Resize (default on, as torchvision >= 0.17 does "
                            "on tensors; the official eval.py's environment.yml leaves torchvision unpinned, its training "
                            "environment pins 0.8.1, which had no antialias)")
    recon.add_argument("--latent-transform", action=argparse.BooleanOptionalAction, default=False,
                       help="also Figure 3: rFID between tau x and D(tau E(x)) for s = 0.75, 0.5, 0.25 and rotations "
                            "pi/2, pi, 3pi/2 (averaged)")
    tau_flags(recon)
    inception_flags(recon)
    recon.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True,
                       help="compute LPIPS-VGG (needs torchvision's VGG16 weights, or --lpips-random)")
    recon.add_argument("--lpips-random", action=argparse.BooleanOptionalAction, default=False,
                       help="random LPIPS VGG backbone for offline smoke runs (LPIPS then not comparable)")
    recon.add_argument("--sqrtm", default="scipy", choices=["scipy", "eigh"],
                       help="matrix square root in the Frechet distance: scipy (ADM's and pytorch-fid's) or eigh (faster); "
                            f"with at most {POOL_DIM} images the exact low-rank form is used instead (no square root)")
    recon.add_argument("--out", default=None, help="JSON file for the table (default results/recon.json)")

    equiv = sub.add_parser("equiv", help="equivariance error of App. C.3 under rotations and scalings (Table 1)")
    ae_flags(equiv)
    tau_flags(equiv)
    equiv.add_argument("--out", default=None, help="JSON file for the table (default results/equiv.json)")

    idp = sub.add_parser("id", help="intrinsic dimension of the latent codes, MLE and TwoNN (Table 5)")
    ae_flags(idp)
    idp.add_argument("--mle-k", type=int, default=MLE_NEIGHBOURS, help="neighbours k of the MLE estimator (default 20)")
    idp.add_argument("--knn-block", type=int, default=KNN_BLOCK,
                     help="rows/columns of one block of the neighbour search (memory: block^2 floats)")
    idp.add_argument("--out", default=None, help="JSON file for the table (default results/id.json)")

    figures = sub.add_parser("figures", help="Figure 1 (left, latent PCA) and Figure 2 (decoding transformed latents) as PNGs")
    ae_flags(figures, num_images=8)
    tau_flags(figures)
    figures.add_argument("--out", required=True, help="folder for the PNG files and figures.json")

    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag, least in (("batch_size", 1), ("num_workers", 0), ("image_size", 1), ("knn_block", 1)):
        if getattr(args, flag, None) is not None and getattr(args, flag) < least:
            parser.error(f"--{flag.replace('_', '-')} must be {least} or more")
    return args


if __name__ == "__main__":
    main(parse_args())
