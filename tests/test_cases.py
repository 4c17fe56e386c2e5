"""Case files: schema, error positions, defaults, duplicate ids, the validate command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.cases import (
    Case,
    CaseError,
    CasePathError,
    Message,
    find_case_files,
    load_cases,
    load_paths,
    main_validate,
    validate_paths,
)
from harness.fixture import FixtureError, build_fixture

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = REPO_ROOT / "cases"
BROKEN_DIR = Path(__file__).resolve().parent / "data" / "broken_cases"

# file -> (line, column, message fragment) of the error the schema check reports first.
BROKEN_SCHEMA = {
    "yaml_syntax.yaml": (6, 5, "YAML syntax error"),
    "unknown_sampling_key.yaml": (8, 7, "unknown key 'temprature' in sampling; did you mean 'temperature'?"),
    "expected_finding_key.yaml": (7, 5, "a case describes the request only"),
    "max_tokens_string.yaml": (8, 19, "max_tokens must be an integer, got string '512'"),
    "negative_temperature.yaml": (9, 20, "temperature must be at least 0, got -0.5"),
    "n_zero.yaml": (7, 37, "n must be at least 1, got 0"),
    "top_logprobs_without_logprobs.yaml": (9, 7, "top_logprobs requires 'logprobs: true'"),
    "empty_messages.yaml": (4, 15, "messages is empty"),
    "duplicate_id.yaml": (7, 5, "duplicate case id 'gemma-duplicate'; first defined at line 2"),
    "invalid_role.yaml": (7, 15, "invalid role 'model'"),
    "invalid_id.yaml": (2, 9, "invalid id 'Gemma Why Sky'"),
    "unknown_mode.yaml": (7, 19, "unknown mode 'websocket'"),
    "missing_cases.yaml": (1, 1, "unknown key 'case' in the file; did you mean 'cases'?"),
    "duplicate_key.yaml": (10, 7, "duplicate key 'temperature' in sampling; first set at line 8"),
    "missing_model.yaml": (2, 5, "case is missing the required key 'model'"),
    "content_not_string.yaml": (6, 18, "content must be a string, got boolean 'yes'"),
    "empty_file.yaml": (1, 1, "file is empty"),
    "bad_defaults.yaml": (4, 12, "top_p must be greater than 0 and at most 1"),
}
# Errors that only appear when files are validated together or with a chat template.
CROSS_FILE = {"duplicate_id_other_file.yaml": (3, 5, "first defined at")}
TEMPLATE = {"roles_not_alternating.yaml": (5, 5, "rejects the messages of case 'gemma-two-user-turns'")}


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return build_fixture()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_broken_corpus_is_complete():
    on_disk = {path.name for path in BROKEN_DIR.glob("*.yaml")}
    assert on_disk == set(BROKEN_SCHEMA) | set(CROSS_FILE) | set(TEMPLATE)
    assert len(on_disk) >= 10


@pytest.mark.parametrize("name", sorted(BROKEN_SCHEMA))
def test_load_cases_points_at_error(name):
    line, column, fragment = BROKEN_SCHEMA[name]
    path = BROKEN_DIR / name
    with pytest.raises(CaseError) as raised:
        load_cases(path)
    error = raised.value
    assert error.path == str(path)
    assert (error.line, error.column) == (line, column)
    assert fragment in error.message
    assert str(error) == f"{path}:{line}:{column}: {error.message}"
    assert "\n" not in str(error)


def test_validate_reports_every_file_without_template():
    errors = validate_paths([BROKEN_DIR], check_template=False)
    expected = {**BROKEN_SCHEMA, **CROSS_FILE}
    reported = {Path(error.path).name for error in errors}
    assert reported == set(expected)
    for name, (line, column, fragment) in expected.items():
        matching = [e for e in errors if Path(e.path).name == name and (e.line, e.column) == (line, column)]
        assert matching, f"no error at {name}:{line}:{column}"
        assert any(fragment in e.message for e in matching), f"{name}: {[e.message for e in matching]}"


def test_validate_reports_all_errors_of_one_file(tmp_path):
    path = write(
        tmp_path,
        "many.yaml",
        """cases:
  - id: gemma-many
    model: google/gemma-3-270m-it
    messages:
      - role: user
        content: Why sky is blue?
    sampling:
      temperature: -1
      n: 0
      top_logprobs: 3
    stream: "false"
  - id: gemma-many
    messages: []
""",
    )
    errors = validate_paths([path], check_template=False)
    positions = [(e.line, e.column) for e in errors]
    assert positions == [(8, 20), (9, 10), (10, 7), (11, 13), (12, 5), (12, 5), (13, 15)]
    messages = [e.message for e in errors]
    assert "stream must be true or false" in messages[3]
    assert {"case is missing the required key 'model'", "duplicate case id 'gemma-many'; first defined at line 2"} == set(
        messages[4:6]
    )


def test_validate_orders_errors_by_file_and_line():
    errors = validate_paths([BROKEN_DIR], check_template=False)
    files = sorted(find_case_files([BROKEN_DIR]))
    order = {str(path): index for index, path in enumerate(files)}
    keys = [(order[e.path], e.line, e.column) for e in errors]
    assert keys == sorted(keys)


@pytest.mark.slow
def test_validate_template_rejects_alternation(gemma_dir):
    errors = validate_paths([BROKEN_DIR / "roles_not_alternating.yaml"], model_dir=gemma_dir)
    assert len(errors) == 1
    line, column, fragment = TEMPLATE["roles_not_alternating.yaml"]
    assert (errors[0].line, errors[0].column) == (line, column)
    assert fragment in errors[0].message
    assert "Conversation roles must alternate" in errors[0].message
    assert str(gemma_dir) in errors[0].message


@pytest.mark.slow
def test_validate_reports_every_file_with_template(gemma_dir):
    errors = validate_paths([BROKEN_DIR], model_dir=gemma_dir)
    reported = {Path(error.path).name for error in errors}
    assert reported == {path.name for path in BROKEN_DIR.glob("*.yaml")}


@pytest.mark.slow
def test_stop_token_id_outside_vocabulary(tmp_path, gemma_dir):
    path = write(
        tmp_path,
        "vocab.yaml",
        """cases:
  - id: gemma-big-stop-id
    model: google/gemma-3-270m-it
    messages:
      - {role: user, content: hi}
    sampling:
      stop_token_ids: [106, 262144]
""",
    )
    errors = validate_paths([path], model_dir=gemma_dir)
    assert [(e.line, e.column) for e in errors] == [(7, 7)]
    assert "[262144] are outside the vocabulary" in errors[0].message


def test_cases_folder_schema_is_valid():
    assert validate_paths([CASES_DIR], check_template=False) == []


@pytest.mark.slow
def test_cases_folder_renders(gemma_dir):
    assert validate_paths([CASES_DIR], model_dir=gemma_dir) == []


def test_gemma_cases_cover_the_brief():
    cases = load_cases(CASES_DIR / "gemma.yaml")
    by_id = {case.id: case for case in cases}
    assert all("gemma" in case_id for case_id in by_id)
    assert all(case.model == "google/gemma-3-270m-it" for case in cases)

    reported = by_id["gemma-reported"]
    assert reported.chat_request() == {
        "model": "google/gemma-3-270m-it",
        "messages": [{"role": "user", "content": "Why sky is blue?"}],
        "temperature": 0.7,
        "max_tokens": 512,
        "stream": False,
    }
    assert not reported.deterministic

    greedy = [case for case in cases if case.sampling.temperature == 0]
    assert all(case.sampling.max_tokens <= 64 for case in greedy)
    assert any(case.stream for case in greedy)
    assert any(case.messages[0].role == "system" for case in cases)
    assert any("assistant" in [m.role for m in case.messages] for case in cases)
    assert any(case.sampling.stop for case in cases)
    assert any(case.sampling.max_tokens == 1 for case in cases)
    assert any(case.sampling.n == 2 and case.deterministic for case in cases)
    assert any(case.sampling.logprobs and case.sampling.top_logprobs for case in cases)


def test_defaults_merge_into_cases(tmp_path):
    path = write(
        tmp_path,
        "defaults.yaml",
        """defaults:
  model: google/gemma-3-270m-it
  sampling: {temperature: 0, max_tokens: 32}
  modes: [grpc]
  tags: [base]
cases:
  - id: gemma-inherits
    messages:
      - {role: user, content: hi}
  - id: gemma-overrides
    model: other/model
    messages:
      - {role: user, content: hi}
    sampling: {max_tokens: 8, stop: "\\n"}
    tags: [own]
""",
    )
    inherits, overrides = load_cases(path)
    assert inherits.model == "google/gemma-3-270m-it"
    assert (inherits.sampling.temperature, inherits.sampling.max_tokens) == (0.0, 32)
    assert inherits.modes == ["grpc"]
    assert inherits.tags == ["base"]
    assert inherits.locations["sampling.max_tokens"] == (3, 30)

    assert overrides.model == "other/model"
    assert (overrides.sampling.temperature, overrides.sampling.max_tokens) == (0.0, 8)
    assert overrides.sampling.stop == ["\n"]
    assert overrides.tags == ["own"]
    assert overrides.chat_request()["stop"] == ["\n"]


def test_case_fields_and_locations(tmp_path):
    path = write(
        tmp_path,
        "full.yaml",
        """cases:
  - id: gemma-full
    model: google/gemma-3-270m-it
    description: every key
    messages:
      - role: system
        content: Be brief.
      - role: user
        content: Why sky is blue?
    sampling:
      temperature: 1
      top_p: 0.9
      top_k: -1
      max_tokens: 8
      stop: [".", "!"]
      stop_token_ids: [106]
      n: 2
      seed: 7
      logprobs: true
      top_logprobs: 0
      ignore_eos: true
    stream: true
    modes: [http, direct]
    tags: [a, b]
""",
    )
    (case,) = load_cases(path)
    assert case == Case(
        id="gemma-full",
        model="google/gemma-3-270m-it",
        description="every key",
        messages=[Message("system", "Be brief."), Message("user", "Why sky is blue?")],
        sampling=case.sampling,
        stream=True,
        modes=["http", "direct"],
        tags=["a", "b"],
        path=str(path),
        line=2,
    )
    sampling = case.sampling
    assert isinstance(sampling.temperature, float)
    assert (sampling.top_p, sampling.top_k, sampling.max_tokens) == (0.9, -1, 8)
    assert (sampling.stop, sampling.stop_token_ids, sampling.n, sampling.seed) == ([".", "!"], [106], 2, 7)
    assert (sampling.logprobs, sampling.top_logprobs, sampling.ignore_eos) == (True, 0, True)
    assert case.locations["messages"] == (5, 5)
    assert case.locations["sampling.stop_token_ids"] == (16, 7)
    body = case.chat_request()
    assert body["stream_options"] == {"include_usage": True}
    assert body["top_logprobs"] == 0
    assert body["n"] == 2


def test_default_modes_depend_on_determinism(tmp_path):
    body = "    model: m\n    messages: [{role: user, content: hi}]\n"
    path = write(
        tmp_path,
        "modes.yaml",
        "cases:\n  - id: sampled\n" + body + "  - id: greedy\n" + body + "    sampling: {temperature: 0}\n"
        "  - id: seeded\n" + body + "    sampling: {temperature: 0.7, seed: 3}\n",
    )
    sampled, greedy, seeded = load_cases(path)
    assert sampled.modes == ["http", "grpc"]
    assert greedy.modes == ["http", "grpc", "direct"]
    assert seeded.modes == ["http", "grpc", "direct"]


def test_load_paths_rejects_duplicates_across_files():
    first = BROKEN_DIR / "duplicate_id.yaml"
    second = BROKEN_DIR / "duplicate_id_other_file.yaml"
    with pytest.raises(CaseError) as raised:
        load_paths([second, first])
    # The within-file duplicate of the second file comes first: it is reported by the parser.
    assert raised.value.path == str(first)
    with pytest.raises(CaseError) as raised:
        load_paths([second, BROKEN_DIR / "invalid_role.yaml"])
    assert "invalid role" in str(raised.value)
    assert [case.id for case in load_paths([CASES_DIR])] == [case.id for case in load_cases(CASES_DIR / "gemma.yaml")]


def test_cross_file_duplicate_names_first_file(tmp_path):
    text = "cases:\n  - id: gemma-same\n    model: m\n    messages: [{role: user, content: hi}]\n"
    first = write(tmp_path, "a.yaml", text)
    second = write(tmp_path, "b.yaml", "# second file\n" + text)
    errors = validate_paths([tmp_path], check_template=False)
    assert len(errors) == 1
    assert errors[0].path == str(second)
    assert (errors[0].line, errors[0].column) == (3, 5)
    assert f"first defined at {first}:2" in errors[0].message


def test_find_case_files_errors(tmp_path):
    with pytest.raises(CasePathError, match="path not found"):
        find_case_files([tmp_path / "missing"])
    (tmp_path / "notes.txt").write_text("not a case file")
    with pytest.raises(CasePathError, match="no \\*.yaml case files found"):
        find_case_files([tmp_path])
    with pytest.raises(CasePathError, match="no path given"):
        find_case_files([])


def test_main_validate_exit_codes(tmp_path, capsys):
    assert main_validate(["--no-template-check", str(CASES_DIR)]) == 0
    output = capsys.readouterr()
    assert "all valid" in output.out
    assert output.err == ""

    assert main_validate(["--no-template-check", str(BROKEN_DIR)]) == 1
    output = capsys.readouterr()
    lines = output.err.strip().splitlines()
    error_lines = [line for line in lines if line.startswith(str(BROKEN_DIR))]
    files_in_output = {Path(line.split(":", 1)[0]).name for line in error_lines}
    assert files_in_output == set(BROKEN_SCHEMA) | set(CROSS_FILE)
    assert lines[-1].endswith(f"of {len(list(BROKEN_DIR.glob('*.yaml')))} case files")

    assert main_validate([str(tmp_path / "missing.yaml")]) == 2
    assert "path not found" in capsys.readouterr().err
    assert main_validate([str(tmp_path)]) == 2
    assert "no *.yaml case files found" in capsys.readouterr().err
    assert main_validate([]) == 2
    assert "no PATH given" in capsys.readouterr().err
    assert main_validate(["--model-dir", str(tmp_path), str(CASES_DIR)]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert main_validate(["--no-such-flag", str(CASES_DIR)]) == 2


def test_validate_command_runs(tmp_path):
    command = [sys.executable, "-m", "harness", "validate", "--no-template-check"]
    valid = subprocess.run(command + [str(CASES_DIR)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert valid.returncode == 0, valid.stderr
    broken = subprocess.run(command + [str(BROKEN_DIR / "n_zero.yaml")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert broken.returncode == 1
    assert f"{BROKEN_DIR / 'n_zero.yaml'}:7:37: n must be at least 1" in broken.stderr
    missing = subprocess.run(command + [str(tmp_path / "none")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1


def test_unusable_model_dir_raises(tmp_path):
    with pytest.raises(FixtureError, match="config.json is missing"):
        validate_paths([CASES_DIR], model_dir=tmp_path)
