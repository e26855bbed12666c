"""Schemathesis against the app's own OpenAPI document, over real HTTP: no 5xx, no drift.

Run through its CLI: its pytest plugin does not work with pytest 9 (it reads a private
attribute pytest removed). The CLI runs every phase, stateful links included.
"""

import subprocess
import sys
from pathlib import Path

from tests.support import Server


def test_api_matches_its_schema_and_never_answers_5xx(server: Server, tmp_path: Path) -> None:
    schemathesis = Path(sys.executable).parent / "schemathesis"
    run = subprocess.run(
        [
            str(schemathesis),
            "run",
            f"{server.base_url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            "50",
            "--no-color",
            "--generation-database",
            "none",
        ],
        capture_output=True,
        timeout=300,
        cwd=tmp_path,
    )
    report = run.stdout.decode() + run.stderr.decode()
    assert run.returncode == 0, report
    assert "No issues found" in report, report
