"""Each pytest-xdist worker computes on its share of the cores: with `-n 2` on 2 cores, two workers at
two threads each (PyTorch's OpenMP, numpy's OpenBLAS) would oversubscribe the machine, and spinning
threads then slow every test several times over."""
import os

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
threads = max(1, (os.cpu_count() or 1) // workers)
os.environ["OPENBLAS_NUM_THREADS"] = str(threads)  # read once, when numpy loads: before any import of it

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Tests that share a module-scoped fixture (a cache, trained checkpoints, a CLI run) go to one
    worker under `--dist loadgroup`, so the fixture is built once, not once per worker; the others
    spread one by one."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shared = defs and any(d[-1].scope == "module" for d in defs.name2fixturedefs.values())
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
