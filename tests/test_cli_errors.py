"""Bad command-line input: one line that names the flag, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["tap", "--listen", "127.0.0.1:99999", "--upstream", "127.0.0.1:1", "--record", "r.jsonl"], "--listen must be HOST:PORT"),
        (["tap", "--listen", "127.0.0.1:5", "--upstream", "nope", "--record", "r.jsonl"], "--upstream must be HOST:PORT"),
        (["tap", "--listen", "127.0.0.1:5", "--upstream", "127.0.0.1:6", "--record", "."], "--record . is a folder"),
        (["fixture", "build", "--out", "/proc/no-such-place/fixture"], "cannot write the fixture to --out"),
        (["matrix", "--router", "nope"], "--router: invalid router release 'nope'"),
        (["bisect", "--good", "vllm==1", "--bad", "smg==1.13.0", "--candidates", "smg==1.13.0"], "not of the form"),
        (["nope"], "unknown command 'nope'"),
    ],
)
def test_bad_input_one_line(argv, expected, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harness", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
