"""README.md stays true: its quickstart runs, and CI runs its test command."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quickstart_generate_command_runs(smollm2_path):
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```", README, re.S)
    assert block, "README lost its quickstart block"
    commands = [line for line in block.group(1).splitlines() if line.startswith("phimlx ")]
    assert commands, "the quickstart has no phimlx command"
    for line in commands:
        argv = [sys.executable, "-m", "phimlx", *shlex.split(line)[1:]]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip(), "no text generated"
        assert "tok/s" in done.stderr  # the stats line


def test_ci_runs_the_readme_test_command():
    tests = README.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(?:.*\n)*?(python -m pytest[^\n]*)\n```", tests).group(1)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == command
