"""Helpers every script shares and that drift when copied.

Rooms: distributed setup/cleanup, rank-0 logging, EMA, checkpoint I/O (atomic save,
weights_only load, RNG state), the weight download cache.
"""
import json
import os
import random
import sys
import tempfile
import time
import urllib.request

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- distributed


def setup_distributed():
    """One code path: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK, otherwise a plain single process.

    Returns (rank, world_size, device). NCCL on CUDA, gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        return rank, world_size, device
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return 0, 1, device


def cleanup():
    """Tear down the process group; safe to call twice or without one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values, device):
    """Average a dict of floats over ranks in one collective (call once per log interval)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------- logging


class Logger:
    """Rank-0 logger: human lines to stdout and log.txt, one JSON object per step to metrics.jsonl."""

    def __init__(self, run_dir=None):
        self.active = is_main() and run_dir is not None
        if self.active:
            os.makedirs(run_dir, exist_ok=True)
            self.log_file = open(os.path.join(run_dir, "log.txt"), "a")
            self.metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a")

    def info(self, msg):
        if not is_main():
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.active:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def metrics(self, step, values):
        if self.active:
            self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")
            self.metrics_file.flush()

    def close(self):
        if self.active:
            self.log_file.close()
            self.metrics_file.close()
            self.active = False


def write_json(path, obj):
    """Write JSON atomically (rank 0 callers only)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training state


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over parameters; buffers are copied."""
    ema_params = dict(ema_model.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), 1.0 - decay)
    ema_buffers = dict(ema_model.named_buffers())
    for name, b in model.named_buffers():
        ema_buffers[name].copy_(b)


def unwrap(model):
    """Strip DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG a resumed run needs to continue bit-for-bit, in weights_only-loadable types."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(obj, path):
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a half file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, trust_checkpoint=False):
    """torch.load with weights_only=True; a file that needs full unpickling is refused unless trusted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path given to the flag")
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)  # explicit --trust-checkpoint
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError wrapped in various types across versions
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__:
            raise RuntimeError(
                f"{path} contains Python objects beyond tensors and cannot be loaded with weights_only=True. "
                f"If you trust the file's origin, pass --trust-checkpoint to unpickle it fully."
            ) from None
        raise RuntimeError(f"could not read checkpoint {path}: {e}. The file may be truncated or corrupt.") from None


# ----------------------------------------------------------------------------- weight cache


def cache_dir():
    return os.environ.get("EQVAE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "eqvae"))


def download(url, relpath):
    """Path of `relpath` inside the cache dir, downloading `url` there once.

    Offline (or on any download failure) the error names the URL and the path to place the file at.
    """
    path = os.path.join(cache_dir(), relpath)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part{os.getpid()}"  # per process: concurrent downloads never share a file
    try:
        headers = {"User-Agent": "eqvae"}
        if "huggingface.co" in url and os.environ.get("HF_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
        print0(f"downloading {url} -> {path}")
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, path)
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(
            f"could not download {url} ({e}).\nDownload it by hand and place it at:\n  {path}\n"
            f"(set $EQVAE_CACHE to use another cache folder), or pass a local path instead of the name."
        ) from None
    return path


def fail(msg):
    """One clear error line for bad input, raised before any long work starts."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)
