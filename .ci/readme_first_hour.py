"""A newcomer's first hour, as CI runs it: README's install lines in a fresh virtualenv, then README's first
commands with that environment's `vbcompress`, in an empty folder holding only the shipped example.

The commands are read from README.md itself (the first ```bash block under "## Install" and under
"## First commands"), so README and this check cannot drift apart. Exit status: the first failing command's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_block(readme: str, heading: str) -> list[str]:
    section = readme.split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def run(line: str, cwd: Path, venv: Path) -> None:
    print(f"$ {line}", flush=True)
    env_line = re.sub(r"^(pip|vbcompress|python)\b", lambda m: str(venv / "bin" / m.group(1)), line)
    done = subprocess.run(env_line, shell=True, cwd=cwd)
    if done.returncode:
        print(f"README command failed ({done.returncode}): {line}", file=sys.stderr)
        sys.exit(done.returncode)


def main() -> None:
    readme = (REPO / "README.md").read_text()
    install = [line for line in bash_block(readme, "## Install") if "[test]" not in line]  # the user's lines, not the developer's
    first = bash_block(readme, "## First commands")
    with tempfile.TemporaryDirectory() as tmp:
        venv, work = Path(tmp) / "venv", Path(tmp) / "work"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for line in install:
            run(line, REPO, venv)
        work.mkdir()
        shutil.copytree(REPO / "examples", work / "examples")
        for line in first:
            run(line, work, venv)
    print("README's install and first commands ran in a fresh virtualenv")


if __name__ == "__main__":
    main()
