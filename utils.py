"""Helpers every script shares and that drift when copied.

Rooms: distributed setup/cleanup, rank-0 logging, EMA, checkpoint I/O (atomic save,
weights_only load, RNG state), training runs (run folders, resume, stop signals, step checks,
labelled image grids), the weight download cache.
"""
import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
import zipfile

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


def cleanup(sync=True):
    """Tear down the process group; safe to call twice or without one. Called from a `finally`
    while an error propagates, it skips the barrier: the other ranks may wait in a collective that
    never comes, and the error must reach torchrun (which stops them) now, not at the timeout.
    sync=False skips it too, for callers whose ranks already met after their last collective (a
    barrier behind minutes of rank-0-only work would run into NCCL's timeout)."""
    if dist.is_available() and dist.is_initialized():
        error = sys.exc_info()[1]
        if sync and (error is None or (isinstance(error, SystemExit) and error.code in (0, None))):
            dist.barrier()
        dist.destroy_process_group()


def rank_and_world():
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def global_sum(t):
    """(t summed over the ranks, the number of ranks), for means over the whole global batch."""
    if dist.is_available() and dist.is_initialized():
        t = t.detach().clone()
        dist.all_reduce(t)
        return t, dist.get_world_size()
    return t.detach(), 1


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank."""
    if dist.is_available() and dist.is_initialized():
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


def gather_object(obj):
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def precision_setup(precision, device):
    """(precision, torch.autocast kwargs) for --precision (None: bf16 on GPU, fp32 on CPU). Also
    allows TF32 on CUDA and flushes denormals on CPU (subnormal floats slow CPU kernels a lot)."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_flush_denormal(True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return precision, dict(device_type=device.type, dtype=dtype, enabled=precision != "fp32")


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
        if self.active:  # NaN/inf (an fp16 step the scaler skipped) as null: JSON has no such numbers
            values = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
            self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")
            self.metrics_file.flush()

    def drop_after(self, step):
        """On resume: metrics.jsonl keeps the records up to `step`, the resumed checkpoint's (a run
        stopped after its last save logged steps that are now trained again)."""
        if not self.active:
            return
        self.metrics_file.close()
        path = self.metrics_file.name
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except ValueError:  # a line cut short when the run was killed
                    continue
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
        self.metrics_file = open(path, "a")

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


def shared_tempfile(folder, prefix, suffix=""):
    """mkstemp in `folder` (unique across processes and machines), readable as the umask allows:
    mkstemp's 0600 would hide shared checkpoints and caches from teammates. Returns (fd, path)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.fchmod(fd, shared_mode())
    return fd, tmp


def shared_mode():
    """The permissions a new file gets from open() under the current umask (0o666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_checkpoint(obj, path):
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a half file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = shared_tempfile(folder, ".tmp-", ".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            fail(f"could not write {path} ({type(e).__name__}: {e}): is the disk full or the folder not writable?")
        raise


def load_checkpoint(path, trust_checkpoint=False):
    """torch.load with weights_only=True; a file that needs full unpickling is refused unless trusted."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: check the path given to the flag")
    with open(path, "rb") as f:
        head = f.read(32)
    # torch.save writes a zip, or (before torch 1.6) a pickle whose first object is its magic number
    legacy = head.startswith(b"\x80") and b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") in head
    if not zipfile.is_zipfile(path) and not legacy:
        what = ("a truncated zip (an interrupted copy or download?)" if head[:2] == b"PK" else
                "a pickle, but not one torch.save wrote" if head.startswith(b"\x80") else
                "neither torch.save's zip format nor a pickle")
        raise RuntimeError(f"{path} is not a PyTorch checkpoint ({what}): check the path, or get the file again")
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


# ----------------------------------------------------------------------------- training runs


def make_run_dir(results_dir, name):
    """results/NNN-name, numbered like DiT's experiment folders; every rank gets rank 0's choice.
    The folder is claimed with an exclusive mkdir, so two jobs started at once (a job array on a
    shared results folder) take different numbers instead of writing into one folder."""
    safe = name.replace("/", "-").replace(":", "-").replace(".", "_")
    path = None
    if is_main():
        os.makedirs(results_dir, exist_ok=True)
        existing = [int(d.split("-")[0]) for d in os.listdir(results_dir) if d.split("-")[0].isdigit()]
        number = max(existing, default=-1)
        while path is None:
            number += 1
            try:
                os.mkdir(os.path.join(results_dir, f"{number:03d}-{safe}"))
                path = os.path.join(results_dir, f"{number:03d}-{safe}")
            except FileExistsError:  # another job took it between the listing and the mkdir
                pass
    return broadcast_object(path)


def check_output_folders(args, *folder_flags):
    """Before any long work: a --run-dir that holds checkpoints is continued with --resume, not
    overwritten by a new run (a requeued job without --resume), and the folders of `folder_flags`
    (and --run-dir, --results-dir) can be created and written."""
    ckpts = os.path.join(args.run_dir, "checkpoints") if args.run_dir else None
    if ckpts and not args.resume and os.path.isdir(ckpts) and any(f.endswith(".pt") for f in os.listdir(ckpts)):
        fail(f"--run-dir {args.run_dir} holds a run already: continue it with --resume {args.run_dir}, or choose "
             f"another --run-dir")
    for flag in ("run_dir", "results_dir", *folder_flags):
        path = getattr(args, flag, None)
        blocked = unwritable_ancestor(path) if path else None
        if blocked:
            fail(f"--{flag.replace('_', '-')} {path}: {blocked} is not a writable folder")


def unwritable_ancestor(folder):
    """None when `folder` exists and is writable or can be created; else the path that blocks it
    (a file, or a folder without write permission, or on a read-only file system)."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return None if os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK) else existing


def explicit_flags(parser, argv=None):
    """The destinations of the flags given on the command line (not taken from defaults)."""
    bare = copy.deepcopy(parser)
    bare._defaults = {}  # set_defaults (presets, recipes) also fills the namespace from here
    for action in bare._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(bare.parse_args(argv)))


def open_run(args, resume_path, name, world_size, device, precision, notes=()):
    """The run folder: --run-dir, else a resumed run's own, else a new numbered one named `name`
    under --results-dir. Rank 0 creates its checkpoints/ and writes args.json; every rank gets a
    logger that has logged the run's first line and the notes. Returns (run folder, logger,
    checkpoint folder)."""
    run_dir = args.run_dir or (run_dir_of(resume_path) if resume_path else make_run_dir(args.results_dir, name))
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if is_main():
        os.makedirs(ckpt_dir, exist_ok=True)
        write_json(os.path.join(run_dir, "args.json"), vars(args))
    barrier()
    logger = Logger(run_dir)
    for line in (f"run folder {run_dir}; world size {world_size}; device {device}; precision {precision}", *notes):
        logger.info(line)
    return run_dir, logger, ckpt_dir


def due(step, every, max_steps):
    """Whether a periodic action (log line, checkpoint, sample grid, evaluation) runs after `step`:
    every `every` steps (0: never) and after the last one."""
    return every > 0 and (step % every == 0 or step == max_steps)


class IntervalLog:
    """Per-step values (tensors, summed on their device: no host sync per step), averaged over each
    --log-every interval and over the ranks (one all-reduce), then one dense log line and one
    metrics.jsonl record with lr, steps/s, images/s and peak GPU memory."""

    def __init__(self, logger, every, max_steps, images_per_step, device):
        self.logger, self.every, self.max_steps = logger, every, max_steps
        self.images_per_step, self.device = images_per_step, device
        self.sums, self.count, self.t0 = {}, 0, time.time()

    def add(self, step, lr, values):
        """Count `values` (name -> tensor) for the step just taken; at an interval's end, log it."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        self.count += 1
        if not due(step, self.every, self.max_steps):
            return
        seconds = time.time() - self.t0
        means = all_reduce_mean({k: float(v) / self.count for k, v in self.sums.items()}, self.device)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        record = {f"train/{k}": v for k, v in means.items()}
        record.update({"train/lr": lr, "train/steps_per_sec": self.count / seconds,
                       "train/images_per_sec": self.count * self.images_per_step / seconds, "train/peak_mem_gb": peak})
        self.logger.info(f"step {step}/{self.max_steps} " + " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in record.items()))
        self.logger.metrics(step, record)
        self.sums, self.count, self.t0 = {}, 0, time.time()


def resolve_resume(path):
    """--resume takes a checkpoint, a run folder, or its checkpoints/ folder (then latest.pt)."""
    for candidate in (path, os.path.join(path, "latest.pt"), os.path.join(path, "checkpoints", "latest.pt")):
        if os.path.isfile(candidate):
            return candidate
    fail(f"--resume {path}: no checkpoint there (looked for the file, latest.pt and checkpoints/latest.pt)")


def run_dir_of(checkpoint_path):
    """The run folder a checkpoint belongs to: the parent of checkpoints/, else its own folder."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def changed_flags(args, saved, keys):
    """'--flag value (checkpoint: old)' for each of `keys` given on the command line with another value
    than the saved run arguments `saved`."""
    return [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {saved[k]})" for k in keys
            if k in args.cli_flags and k in saved and getattr(args, k) != saved[k]]


def resume_args(args, fixed, changeable=(), allow_changed=False):
    """--resume for a trainer: (checkpoint path, checkpoint). Flags not given on the command line take
    the run's saved values; changing one of `fixed` (architecture, objective, data) is refused, and
    one of `changeable` too unless `allow_changed` (the caller's --allow-changed-flags)."""
    path = resolve_resume(args.resume)
    try:
        ckpt = load_checkpoint(path, args.trust_checkpoint)
    except (OSError, RuntimeError) as e:
        fail(f"--resume {path}: {e}")
    if not isinstance(ckpt, dict) or not {"args", "step"} <= ckpt.keys():
        fail(f"--resume {path} holds weights, not a training state (no saved flags and step): start a new run from "
             f"it (train_vae.py --vae FILE, the other trainers --init-from FILE), or resume RUN/checkpoints/latest.pt")
    saved = ckpt["args"]
    changed = changed_flags(args, saved, fixed)
    if changed:
        fail(f"--resume {path} keeps its model, objective and data: remove {', '.join(changed)}")
    changed = [] if allow_changed else changed_flags(args, saved, changeable)
    if changed:
        fail(f"--resume {path} continues its objective and data: remove {', '.join(changed)}, "
             f"or pass --allow-changed-flags to continue with the new values")
    for key, value in saved.items():  # flags not given now continue as the run was started
        if key not in args.cli_flags and key not in ("resume", "run_dir", "preset", "cli_flags", "init_from"):
            setattr(args, key, value)
    return path, ckpt


def start_cache_run(args, fixed, check_args, world_size, cache_flag):
    """The first step of the cache trainers (train_dit.py --latents, train_maskgit.py --tokens),
    before the cache or any model is read: --resume takes the run's flags (its cache exists: never
    rebuilt), an --epochs given now wins over a preset's or the run's step count, then `check_args`,
    the output folders, and the cache folder made absolute (saved with the run: --resume works from
    any directory). Returns (checkpoint path, checkpoint), (None, None) for a new run."""
    path, ckpt = resume_args(args, fixed) if args.resume else (None, None)
    if path:
        args.data_path = None
    if "epochs" in args.cli_flags and "max_steps" not in args.cli_flags:
        args.max_steps = None
    check_args(args, world_size)
    # a new run into a folder with checkpoints is refused; the folders it writes must be writable
    check_output_folders(args, *((cache_flag,) if args.data_path else ()))
    setattr(args, cache_flag, os.path.abspath(getattr(args, cache_flag)))
    return path, ckpt


def restore_training(ckpt, model, ema, opt, scaler, rank, world_size, seed, logger):
    """Load a trainer checkpoint's weights, EMA (when kept), optimizer, loss scale and this rank's RNG
    streams; returns the step. From a run on another number of processes the streams are reseeded;
    a run that kept no EMA and now does starts it from the weights."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        fail(f"--resume: the checkpoint's network does not fit this run's data (another cache folder?): {e}")
    if ema is not None and ckpt.get("ema") is None:
        ema.load_state_dict(model.state_dict())
        logger.info("the resumed run kept no EMA: it starts from the resumed weights")
    elif ema is not None:
        ema.load_state_dict(ckpt["ema"])
    elif ckpt.get("ema") is not None:
        logger.info("--ema-decay 0: the resumed run's EMA is dropped; checkpoints and grids hold the raw weights")
    opt.load_state_dict(ckpt["opt"])
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    step = ckpt["step"]
    logger.drop_after(step)
    if len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank])
    else:
        logger.info(f"resuming with {world_size} processes from a {len(ckpt['rng'])}-process run: RNG streams reseeded")
        seed_everything(seed * world_size + rank + 1_000_003 * step)
    return step


def save_step(payload, ckpt_dir, step, local_rng):
    """Save checkpoints/NNNNNNN.pt with every rank's RNG state (gathered: call on all ranks) and
    point latest.pt at it atomically (a hard link swapped in with a rename)."""
    states = gather_object(local_rng)
    if is_main():
        name = os.path.join(ckpt_dir, f"{step:07d}.pt")
        save_checkpoint({**payload, "rng": states}, name)
        tmp = os.path.join(ckpt_dir, ".latest.tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
        os.link(name, tmp)
        os.replace(tmp, os.path.join(ckpt_dir, "latest.pt"))
    barrier()


class StopSignal:
    """SIGTERM/SIGINT set `requested` instead of killing the process, so the loop can finish its
    step, save and exit; `close()` restores the previous handlers."""

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:  # Ctrl-C twice: stop now, without the save
            self.close()
            raise KeyboardInterrupt
        self.requested = True

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def step_flags(loss_values, stop_requested, device):
    """(non-finite loss on any rank, stop requested on any rank) in one small all-reduce: the
    step's only host sync, and a bad step is never applied."""
    finite = torch.isfinite(torch.stack([v.float() for v in loss_values])).all()
    flags = torch.stack([(~finite).float(), torch.tensor(float(stop_requested), device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags)
    nonfinite, stop = flags.tolist()
    return bool(nonfinite), bool(stop)


def stop_nonfinite(logger, step, ckpt_dir, advice, what="loss or gradient"):
    """After step_flags found a NaN/inf in the step after `step` (the steps done): say so, keep the
    last good checkpoint, and exit with code 3 before the step is applied."""
    if os.path.isfile(os.path.join(ckpt_dir, "latest.pt")):
        logger.info(f"non-finite {what} at step {step + 1}: stopping without applying it; the last good checkpoint "
                    f"in {ckpt_dir} is kept. {advice}, then --resume.")
    else:
        logger.info(f"non-finite {what} at step {step + 1}: stopping without applying it, before any checkpoint. "
                    f"{advice}, and start again.")
    raise SystemExit(3)


def optimizer_step(loss, params, opt, scaler, max_norm, stop_requested, device):
    """Backward, clip, check, update: the step of the one-network trainers (and of bench.py). The
    check (step_flags) covers the loss and the gradient norm; under fp16 the loss only, since an
    inf gradient there is the scaler's cue to skip the update and lower its scale, not an error.
    After a NaN/inf the update is not applied. Returns (gradient norm before clipping, non-finite,
    stop requested on any rank)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    checks = [loss.detach()] + ([] if scaler.is_enabled() else [grad_norm])
    nonfinite, stop_now = step_flags(checks, stop_requested, device)
    if not nonfinite:
        scaler.step(opt)
        scaler.update()
        nonfinite = scale_collapsed(scaler)
    return grad_norm, nonfinite, stop_now


def scale_collapsed(scaler):
    """fp16: a loss scale halved below 1 (16 skipped steps in a row from 65536) means gradients that
    are not finite even unscaled: every update is being skipped, so the run must stop, not go on
    learning nothing. Equal on every rank (the gradients are all-reduced), so no collective."""
    return scaler.is_enabled() and scaler.get_scale() < 1.0


def exit_on_stop(logger, ckpt_dir, step, resume_from):
    """After the checkpoint of a step where a stop was requested: say how to continue, exit 0."""
    logger.info(f"stop requested (SIGTERM/SIGINT): saved {ckpt_dir}/latest.pt at step {step}; "
                f"continue with --resume {resume_from}")
    raise SystemExit(0)


def check_ranges(args, rates=(), below_one=(), counts=(), zero_or_more=()):
    """The trainers' numeric flags, one clear line for the first out of range: `rates` (learning
    rates, weights, scales) finite and 0 or more, `below_one` (decays, probabilities) also below 1,
    `counts` positive integers, `zero_or_more` integers 0 or more. Unset flags (None) pass."""
    for flag in (*rates, *below_one):
        value = getattr(args, flag)
        if value is not None and (not math.isfinite(value) or value < 0 or (flag in below_one and value >= 1)):
            fail(f"--{flag.replace('_', '-')} {value} is out of range")
    for flag in counts:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            fail(f"--{flag.replace('_', '-')} must be a positive integer, not {value}")
    for flag in zero_or_more:
        value = getattr(args, flag)
        if value is not None and value < 0:
            fail(f"--{flag.replace('_', '-')} must be 0 or more, not {value}")


def epoch_plan(num_items, source, global_batch_size, world_size, max_steps, epochs, grad_accum=1):
    """(per-rank batch, steps per epoch, total steps): each rank takes global_batch_size / world_size
    items per micro-batch, an epoch drops its remainder, and --max-steps wins over --epochs. Fails,
    naming `source`, when the data holds less than one step."""
    per_rank = global_batch_size // world_size
    steps_per_epoch = num_items // world_size // (per_rank * grad_accum)
    if steps_per_epoch == 0:
        fail(f"{source} holds {num_items} images, fewer than one step of {global_batch_size * grad_accum}: lower "
             f"--global-batch-size" + (" or --grad-accum" if grad_accum > 1 else ""))
    return per_rank, steps_per_epoch, max_steps if max_steps is not None else epochs * steps_per_epoch


def save_step_grid(draw, run_dir, step, logger):
    """Rank 0 draws the sample grid of `step` into run_dir/samples-NNNNNNN.png (`draw(path)`); the
    other ranks wait for it."""
    if is_main():
        path = os.path.join(run_dir, f"samples-{step:07d}.png")
        draw(path)
        logger.info(f"sample grid {path}")
    barrier()


def grid_labels(num_classes, columns=10):
    """Up to `columns` classes spread evenly over the label range, one grid column each."""
    cols = min(columns, num_classes)
    return [round(i * num_classes / cols) for i in range(cols)]


def save_labelled_grid(columns, labels, path, min_size=128, row_labels=None):
    """One PNG: a column per (N, 3, H, W) tensor in [0, 1] (all the same size), a row per image, under
    a header naming each column (labels may hold one line break); `row_labels` (N strings) name the
    rows in a left margin. Images smaller than min_size pixels are enlarged by an integer factor
    with nearest neighbours, so pixels stay visible."""
    import torch.nn.functional as F
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    cells = torch.stack([c.float().cpu().clamp(0, 1) for c in columns], 1).flatten(0, 1)  # (N*cols, 3, H, W)
    factor = max(1, min_size // cells.shape[-1])
    if factor > 1:
        cells = F.interpolate(cells, scale_factor=factor, mode="nearest")
    grid = make_grid(cells, nrow=len(columns), padding=2, pad_value=1.0)
    body = Image.fromarray(grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    lines = max(len(label.split("\n")) for label in labels)
    header = 12 * lines + 4
    margin = 6 * max(len(r) for r in row_labels) + 8 if row_labels else 0
    canvas = Image.new("RGB", (body.width + margin, body.height + header), "white")
    canvas.paste(body, (margin, header))
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = cells.shape[-1] + 2, cells.shape[-2] + 2
    max_chars = max(4, cell_w // 6)
    for j, label in enumerate(labels):
        for i, line in enumerate(label.split("\n")):
            line = line if len(line) <= max_chars else ".." + line[-(max_chars - 2):]
            draw.text((margin + 4 + j * cell_w, 2 + 12 * i), line, fill=(0, 0, 0))
    for i, label in enumerate(row_labels or []):
        draw.text((4, header + i * cell_h + cell_h // 2 - 6), label, fill=(0, 0, 0))
    canvas.save(path)


# ----------------------------------------------------------------------------- weight cache


def cache_dir():
    return os.environ.get("EQVAE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "eqvae"))


@contextlib.contextmanager
def cache_lock(path):
    """Hold an exclusive lock on the cache entry `path` (a `.lock` file beside it): of the processes
    that need it (every rank, every node sharing the cache), one writes it while the others wait,
    then find it in place. No collective: callers may run on one rank only."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def download(url, relpath):
    """Path of `relpath` inside the cache dir, downloading `url` there once (under cache_lock).

    A transfer that stops early (fewer bytes than Content-Length) or a web page instead of the file
    is never put in place. Offline (or on any failure) the error names the URL and where to put the file.
    """
    path = os.path.join(cache_dir(), relpath)
    if os.path.isfile(path):
        return path
    with cache_lock(path):
        if os.path.isfile(path):  # another process fetched it while this one waited
            return path
        fd, tmp = shared_tempfile(os.path.dirname(path), os.path.basename(path) + ".part")
        try:
            headers = {"User-Agent": "eqvae"}
            if "huggingface.co" in url and os.environ.get("HF_TOKEN"):
                headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
            print(f"downloading {url} -> {path}", flush=True)
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                if r.headers.get_content_type() == "text/html":
                    raise RuntimeError("the server sent a web page, not the file (a login, rate-limit or error page)")
                written = 0
                while chunk := r.read(1 << 20):
                    written += f.write(chunk)
            expected = r.headers.get("Content-Length")
            if expected is not None and written != int(expected):  # http.client ends a cut transfer quietly
                raise RuntimeError(f"the transfer stopped after {written} of {expected} bytes")
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
