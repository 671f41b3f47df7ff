"""The README's commands stay true: every `python SCRIPT.py ...` and `torchrun ... SCRIPT.py ...` it
shows, in its bash blocks and inline, is accepted by that script's own argument parser (a renamed
or removed flag fails here, not in a reader's terminal). Parsing only: nothing runs."""
import contextlib
import importlib
import io
import os
import re
import shlex

import pytest

from cli import ROOT

SCRIPTS = ("train_vae", "train_dit", "train_maskgit", "sample", "evaluate", "bench")


def readme_commands():
    """(script, argv) for each script call in README.md: bash blocks with their line continuations
    joined and comments cut, and inline code spans; `&&`, `;` and pipes split a line."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    lines += re.findall(r"`((?:python|torchrun)[^`]*\.py[^`]*)`", text.replace("\n", " "))
    calls = []
    for line in lines:
        for part in re.split(r"&&|\|\||;|\|", line):
            tokens = shlex.split(part)
            scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
            if scripts:
                i = scripts[0]
                calls.append((tokens[i][:-3], [t for t in tokens[i + 1:] if t != "..."]))  # "...": elided flags
    return calls


CALLS = readme_commands()


def test_the_readme_shows_commands_of_every_stage():
    assert {script for script, _ in CALLS} == set(SCRIPTS)
    assert len(CALLS) > 40


@pytest.mark.parametrize("script,argv", CALLS, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CALLS)])
def test_readme_command_parses(script, argv):
    if script == "bench" and ({"--device", "--official-dit"} & set(argv)):
        pytest.skip("bench.py checks the GPU and the official code's folder while parsing")
    module = importlib.import_module(script)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(argv)
    except SystemExit:
        pytest.fail(f"README: python {script}.py {' '.join(argv)}\n{err.getvalue()}")
