"""README's quickstart and ``.ci/run`` must not drift apart: CI proves exactly the
commands a newcomer is told to run (install, the main job, the tests)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


#: The README's first lines get a newcomer a clone and a virtual environment; CI runs in
#: a clone already and makes its own environment, so these are the only lines it skips.
SETUP = ("git clone ", "python3 -m venv ")


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quickstart = text.split("## Install", 1)[1].split("## Choosing an adjoint", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert any(line.startswith(SETUP[0]) for line in lines), "the clone/venv lines are gone"
    return [line for line in lines if not line.startswith(SETUP)]


def test_ci_runs_the_readme_install_demo_and_test_commands_verbatim() -> None:
    commands = _readme_commands()
    assert "python -m symplectic_adjoint demo" in commands
    assert "python -m pytest -q" in commands
    assert any(c.startswith("python -m pip install -c constraints.txt") for c in commands)
    ci_lines = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}
    # .ci/run may add pip's -q; the command itself must be the README's.
    ci_lines |= {line.replace("pip install -q ", "pip install ") for line in ci_lines}
    missing = [c for c in commands if c not in ci_lines]
    assert not missing, f".ci/run does not run these README commands: {missing}"
