"""The README's walk-through, run as written: from an empty directory to an exported model.

The blocks fenced as ```` ```bash walkthrough ```` are taken from README.md in
order and run as one bash script (``set -euo pipefail``) in an empty
directory, with the project's ``.venv/bin`` first on PATH, as the README tells
a reader to set up. Nothing is rewritten, so the doc cannot drift from what
works.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripted import ROOT

FENCE = re.compile(r"^```bash walkthrough\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def walkthrough(readme: Path) -> list[str]:
    """The walk-through's blocks, in the order the README gives them."""
    return [m.group(1) for m in FENCE.finditer(readme.read_text())]


def test_the_walkthrough_is_there_and_covers_the_run_end_to_end() -> None:
    script = "\n".join(walkthrough(ROOT / "README.md"))
    for step in (
        "gdfed init-state",
        "gdfed serve",
        "gdfed work",
        "gdfed status",
        "gdfed admin",
        "gdfed export",
    ):
        assert step in script, f"the README's walk-through no longer shows `{step}`"


@pytest.mark.slow
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    script = "set -euo pipefail\n" + "\n".join(walkthrough(ROOT / "README.md"))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("GDFED_ADMIN_TOKEN", None)
    env.pop("GDFED_SITE_TOKEN", None)
    # Its own session: the aggregator and workers it starts in the background share its process
    # group, so whatever happens none of them outlives the test.
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=480)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")) if p.is_file()
    )
    assert proc.returncode == 0, f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}{logs}"
    assert (tmp_path / "finetuned" / "config.json").is_file()
