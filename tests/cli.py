"""Run a script's real command line (its `if __name__ == "__main__"` block, argv, cwd, environment)
and get back a subprocess.CompletedProcess. A Python process takes 4 to 5 s to import torch on a slow
CPU, and the suite runs about a hundred command lines, so one process runs here, in the test's
interpreter, and several start as torchrun starts them (its environment variables for each rank; the
first rank to fail stops the others) without torchrun's own interpreter. test_utils runs the real
torchrun; tests that signal a run or limit its resources start their own process."""
import contextlib
import io
import os
import random
import runpy
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def run(script, args, nproc=1, cwd=ROOT, env=None, timeout=300):
    """`python script args` (nproc 1) or what `torchrun --standalone --nproc_per_node=nproc script args`
    runs, in `cwd`, with `env` added to the environment and one thread per process; `timeout` bounds
    the ranks (a run in this process has none)."""
    env = {**ENV, **(env or {})}
    script, args = os.path.join(ROOT, script), [str(a) for a in args]
    if nproc == 1:
        return _in_this_process(script, args, cwd, env)
    return _ranks(script, args, nproc, cwd, env, timeout)


def _ranks(script, args, nproc, cwd, env, timeout):
    """One process per rank with the variables torchrun sets (the scripts read RANK, LOCAL_RANK,
    WORLD_SIZE and init_process_group's env:// reads MASTER_ADDR/PORT); their stdout and stderr
    joined rank by rank; the exit status of the first rank that failed, whose failure ends the rest."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs, outputs = [], []
    for rank in range(nproc):
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(nproc),
                        LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        outputs.append((out, err))
        procs.append(subprocess.Popen([sys.executable, script, *args], cwd=cwd, env=rank_env, stdout=out, stderr=err, text=True))
    deadline, failed = time.monotonic() + timeout, None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([script, *args], timeout)
            failed = next((p.returncode for p in procs if p.returncode), None)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    code = failed or next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess([script, *args], code, *("".join(_read(files[i]) for files in outputs) for i in (0, 1)))


def _read(file):
    with file:
        file.seek(0)
        return file.read()


def _in_this_process(script, args, cwd, env):
    """What the script would do in a process of its own, with the process-wide state it may change put
    back afterwards: environment (and urllib's opener, which keeps the proxies of the environment it
    was built in), cwd, argv, gradient mode (sample.py turns it off), denormal flushing (the trainers
    turn it on), thread count, the global RNGs. Warnings are shown as a fresh process shows them
    (pytest would otherwise keep them), after the script's own stderr."""
    saved = dict(environ=dict(os.environ), cwd=os.getcwd(), argv=sys.argv, threads=torch.get_num_threads(),
                 grad=torch.is_grad_enabled(), rng=(torch.get_rng_state(), np.random.get_state(), random.getstate()))
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    try:
        os.environ.clear()
        os.environ.update(env)
        urllib.request.install_opener(None)
        os.chdir(cwd)
        sys.argv = [script, *args]
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("default")
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as stop:  # as the interpreter maps sys.exit's argument to an exit status
                if isinstance(stop.code, int) or stop.code is None:
                    code = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
            for w in shown:
                stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    finally:
        os.environ.clear()
        os.environ.update(saved["environ"])
        os.chdir(saved["cwd"])
        sys.argv = saved["argv"]
        torch.set_num_threads(saved["threads"])
        torch.set_grad_enabled(saved["grad"])
        torch.set_flush_denormal(False)
        torch.set_rng_state(saved["rng"][0])
        np.random.set_state(saved["rng"][1])
        random.setstate(saved["rng"][2])
        urllib.request.install_opener(None)
    return subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())
