"""YAML chat cases: the schema, loading and validation.

A case file is a YAML mapping with a ``cases:`` list and an optional ``defaults:`` mapping
merged into every case of that file. cases/README.md documents each key. Every error names
``FILE:LINE:COLUMN`` of the YAML node at fault, taken from PyYAML's node marks, so the
loader works on the composed node tree rather than on plain Python values.

A case describes a request only. The schema has no key for an expected result: findings come
from what the runs return, never from the case file.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from harness.capture import MODES

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")
ROLES = ("system", "user", "assistant")

TOP_LEVEL_KEYS = ("cases", "defaults")
CASE_KEYS = ("id", "model", "description", "messages", "sampling", "stream", "modes", "tags")
REQUIRED_CASE_KEYS = ("id", "model", "messages")
# Keys a ``defaults:`` mapping may set; ``id`` and ``messages`` belong to one case only.
DEFAULT_KEYS = ("model", "description", "sampling", "stream", "modes", "tags")
MESSAGE_KEYS = ("role", "content")
SAMPLING_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "stop",
    "stop_token_ids",
    "n",
    "seed",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
)
# The OpenAI chat API accepts top_logprobs from 0 to 20.
MAX_TOP_LOGPROBS = 20


@dataclass
class Message:
    role: str
    content: str


@dataclass
class Sampling:
    """Sampling parameters of a case, with the OpenAI chat API's names and defaults."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    ignore_eos: bool = False


def default_modes(sampling: "Sampling") -> list[str]:
    """Return the modes a case runs in when it names none.

    The direct mode is only worth its decode time when outputs are comparable: a sampled,
    unseeded case (like a temperature 0.7 request) gets no direct run by default.
    """
    if sampling.temperature == 0 or sampling.seed is not None:
        return list(MODES)
    return [mode for mode in MODES if mode != "direct"]


@dataclass
class Case:
    id: str
    model: str
    messages: list[Message]
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    modes: list[str] = field(default_factory=lambda: list(MODES))
    tags: list[str] = field(default_factory=list)
    description: str = ""
    # Where the case was defined, for error messages and pytest's reportinfo.
    path: str = ""
    line: int = 0
    # 1-based (line, column) of each key the file set, by dotted name ("messages",
    # "sampling.stop_token_ids"); a key taken from ``defaults:`` points into the defaults.
    locations: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def deterministic(self) -> bool:
        """Return True when output streams of two runs must be equal (greedy or seeded)."""
        return (self.sampling.temperature == 0) or (self.sampling.seed is not None)

    def chat_request(self) -> dict[str, Any]:
        """Build the ``/v1/chat/completions`` body this case sends, exactly as written."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "stream": self.stream,
        }
        sampling = self.sampling
        for name in ("temperature", "top_p", "top_k", "max_tokens", "seed", "top_logprobs"):
            value = getattr(sampling, name)
            if value is not None:
                body[name] = value
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.stop_token_ids:
            body["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.n != 1:
            body["n"] = sampling.n
        if sampling.logprobs:
            body["logprobs"] = True
        if sampling.ignore_eos:
            body["ignore_eos"] = True
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        return body


class CaseError(ValueError):
    """An invalid case file, as one line: ``FILE:LINE:COLUMN: message`` (1-based)."""

    def __init__(self, path: str | Path, line: int, column: int, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.column = column
        self.message = message
        super().__init__(f"{self.path}:{line}:{column}: {message}")


class CasePathError(ValueError):
    """A path given to the loader does not exist or contains no case files."""


# ---------------------------------------------------------------------------------------------
# Parsing one file
# ---------------------------------------------------------------------------------------------

# Marks a value that failed a check; its error is already recorded.
_INVALID = object()


def _position(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _describe(node: yaml.Node) -> str:
    """Name a node's YAML type and value for a 'got ...' clause."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = node.tag.rsplit(":", 1)[-1]
    names = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "null": "null"}
    if kind == "null":
        return "null"
    return f"{names.get(kind, kind)} {node.value!r}"


class _FileParser:
    """Parse one case file, recording every error instead of stopping at the first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[CaseError] = []
        # (id, line, column) of every case whose id is valid, whether or not the rest is.
        self.ids: list[tuple[str, int, int]] = []
        self._constructor = yaml.SafeLoader("")

    def error(self, node: yaml.Node, message: str) -> None:
        line, column = _position(node)
        self.errors.append(CaseError(self.path, line, column, message))

    # -- the file ------------------------------------------------------------------------------

    def parse(self) -> list[Case]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            self.errors.append(CaseError(self.path, 1, 1, f"file is not UTF-8 text: {error.reason}"))
            return []
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            problem = error.problem or error.context or "invalid YAML"
            context = ""
            if error.context and error.problem:
                where = f" at line {error.context_mark.line + 1}" if error.context_mark else ""
                context = f" ({error.context}{where})"
            self.errors.append(CaseError(self.path, line, column, f"YAML syntax error: {problem}{context}"))
            return []
        except yaml.YAMLError as error:
            self.errors.append(CaseError(self.path, 1, 1, f"YAML syntax error: {error}"))
            return []

        if root is None:
            self.errors.append(CaseError(self.path, 1, 1, "file is empty; expected a mapping with a 'cases:' list"))
            return []
        entries = self.mapping(root, "the file", TOP_LEVEL_KEYS)
        if entries is None:
            return []
        if "cases" not in entries:
            self.error(root, "missing key 'cases' (a list of cases)")
            return []

        defaults: dict[str, tuple[Any, yaml.Node]] = {}
        if "defaults" in entries:
            defaults = self.case_fields(entries["defaults"][1], "defaults", DEFAULT_KEYS)

        cases_node = entries["cases"][1]
        if not isinstance(cases_node, yaml.SequenceNode):
            self.error(cases_node, f"'cases' must be a list of cases, got {_describe(cases_node)}")
            return []
        if not cases_node.value:
            self.error(cases_node, "'cases' is empty; a case file needs at least one case")
            return []

        cases = []
        for case_node in cases_node.value:
            case = self.case(case_node, defaults)
            if case is not None:
                cases.append(case)
        self.check_duplicate_ids()
        return cases

    def check_duplicate_ids(self) -> None:
        first_lines: dict[str, int] = {}
        for case_id, line, column in self.ids:
            if case_id in first_lines:
                message = f"duplicate case id {case_id!r}; first defined at line {first_lines[case_id]}"
                self.errors.append(CaseError(self.path, line, column, message))
            else:
                first_lines[case_id] = line

    # -- one case ------------------------------------------------------------------------------

    def case(self, node: yaml.Node, defaults: dict[str, tuple[Any, yaml.Node]]) -> Case | None:
        fields = self.case_fields(node, "case", CASE_KEYS)
        if not isinstance(node, yaml.MappingNode):
            return None
        if "id" in fields and fields["id"][0] is not _INVALID:
            self.ids.append((fields["id"][0], *_position(fields["id"][1])))
        missing = [key for key in REQUIRED_CASE_KEYS if key not in fields and key not in defaults]
        for key in missing:
            self.error(node, f"case is missing the required key {key!r}")

        merged = dict(defaults)
        merged.update(fields)
        if "sampling" in defaults and "sampling" in fields:
            sampling_defaults, _ = defaults["sampling"]
            sampling_own, sampling_node = fields["sampling"]
            if isinstance(sampling_defaults, dict) and isinstance(sampling_own, dict):
                merged["sampling"] = ({**sampling_defaults, **sampling_own}, sampling_node)

        values = {key: value for key, (value, _) in merged.items()}
        sampling_values = values.get("sampling", {})
        if isinstance(sampling_values, dict):
            self.check_sampling_combinations(sampling_values)
        if missing or any(value is _INVALID for value in values.values()):
            return None
        if any(value is _INVALID for value, _ in sampling_values.values()):
            return None

        locations = {key: _position(key_node) for key, (_, key_node) in merged.items()}
        for name, (_, key_node) in sampling_values.items():
            locations[f"sampling.{name}"] = _position(key_node)

        sampling = Sampling(**{name: value for name, (value, _) in sampling_values.items()})
        line, _ = _position(node)
        return Case(
            id=values["id"],
            model=values["model"],
            messages=values["messages"],
            sampling=sampling,
            stream=values.get("stream", False),
            modes=values.get("modes", default_modes(sampling)),
            tags=values.get("tags", []),
            description=values.get("description", ""),
            path=str(self.path),
            line=line,
            locations=locations,
        )

    def check_sampling_combinations(self, sampling: dict[str, tuple[Any, yaml.Node]]) -> None:
        """Check rules that involve two sampling keys; report each at the dependent key."""
        if "top_logprobs" in sampling:
            logprobs = sampling.get("logprobs", (False, None))[0]
            if logprobs is False:
                _, key_node = sampling["top_logprobs"]
                self.error(key_node, "top_logprobs requires 'logprobs: true'")

    def case_fields(self, node: yaml.Node, mapping_name: str, allowed: tuple[str, ...]) -> dict[str, tuple[Any, yaml.Node]]:
        """Check a case (or defaults) mapping; return key -> (value or _INVALID, key node).

        The key node, not the value node, is kept so locations point at ``key:`` lines.
        """
        entries = self.mapping(node, f"a {mapping_name}" if mapping_name == "case" else f"'{mapping_name}'", allowed)
        if entries is None:
            return {}
        readers: dict[str, Callable[[yaml.Node], Any]] = {
            "id": self.case_id,
            "model": lambda n: self.string(n, "model", allow_empty=False),
            "description": lambda n: self.string(n, "description", allow_empty=True),
            "messages": self.messages,
            "sampling": self.sampling,
            "stream": lambda n: self.boolean(n, "stream"),
            "modes": self.modes,
            "tags": self.tags,
        }
        return {key: (readers[key](value_node), key_node) for key, (key_node, value_node) in entries.items()}

    # -- mappings and keys ---------------------------------------------------------------------

    def mapping(
        self, node: yaml.Node, mapping_name: str, allowed: tuple[str, ...]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """Return key -> (key node, value node); report unknown, duplicate and non-string keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{mapping_name} must be a mapping, got {_describe(node)}")
            return None
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                self.error(key_node, f"keys of {mapping_name} must be strings, got {_describe(key_node)}")
                continue
            key = key_node.value
            if key in entries:
                first_line = entries[key][0].start_mark.line + 1
                self.error(key_node, f"duplicate key {key!r} in {mapping_name}; first set at line {first_line}")
                continue
            if key not in allowed:
                self.error(key_node, self._unknown_key_message(key, mapping_name, allowed))
                continue
            entries[key] = (key_node, value_node)
        return entries

    @staticmethod
    def _unknown_key_message(key: str, mapping_name: str, allowed: tuple[str, ...]) -> str:
        message = f"unknown key {key!r} in {mapping_name}"
        if key.startswith("expect"):
            return message + "; a case describes the request only, and findings come from the observed runs"
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            return message + f"; did you mean {close[0]!r}?"
        return message + f"; allowed keys: {', '.join(allowed)}"

    # -- scalar readers ------------------------------------------------------------------------

    def scalar(self, node: yaml.Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def string(self, node: yaml.Node, name: str, allow_empty: bool) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.error(node, f"{name} must be a string, got {_describe(node)}")
            return _INVALID
        if not allow_empty and not node.value.strip():
            self.error(node, f"{name} must not be empty")
            return _INVALID
        return node.value

    def boolean(self, node: yaml.Node, name: str) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            self.error(node, f"{name} must be true or false, got {_describe(node)}")
            return _INVALID
        return self.scalar(node)

    def integer(self, node: yaml.Node, name: str, minimum: int | None = None, maximum: int | None = None) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:int":
            self.error(node, f"{name} must be an integer, got {_describe(node)}")
            return _INVALID
        value = self.scalar(node)
        if minimum is not None and value < minimum:
            self.error(node, f"{name} must be at least {minimum}, got {value}")
            return _INVALID
        if maximum is not None and value > maximum:
            self.error(node, f"{name} must be at most {maximum}, got {value}")
            return _INVALID
        return value

    def number(self, node: yaml.Node, name: str) -> Any:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            self.error(node, f"{name} must be a number, got {_describe(node)}")
            return _INVALID
        value = float(self.scalar(node))
        if value != value or value in (float("inf"), float("-inf")):
            self.error(node, f"{name} must be a finite number, got {node.value}")
            return _INVALID
        return value

    def sequence(self, node: yaml.Node, name: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{name} must be a list, got {_describe(node)}")
            return None
        return node.value

    # -- case fields ---------------------------------------------------------------------------

    def case_id(self, node: yaml.Node) -> Any:
        value = self.string(node, "id", allow_empty=False)
        if value is _INVALID:
            return value
        if not ID_PATTERN.match(value):
            self.error(
                node,
                f"invalid id {value!r}; use lower-case letters, digits, '.', '_' and '-', "
                "starting with a letter or digit",
            )
            return _INVALID
        return value

    def messages(self, node: yaml.Node) -> Any:
        items = self.sequence(node, "messages")
        if items is None:
            return _INVALID
        if not items:
            self.error(node, "messages is empty; a case needs at least one message")
            return _INVALID
        messages = [self.message(item) for item in items]
        return _INVALID if _INVALID in messages else messages

    def message(self, node: yaml.Node) -> Any:
        entries = self.mapping(node, "a message", MESSAGE_KEYS)
        if entries is None:
            return _INVALID
        missing = [key for key in MESSAGE_KEYS if key not in entries]
        for key in missing:
            self.error(node, f"message is missing the required key {key!r}")

        role = content = _INVALID
        if "role" in entries:
            role_node = entries["role"][1]
            role = self.string(role_node, "role", allow_empty=False)
            if role is not _INVALID and role not in ROLES:
                hint = "; Gemma's 'model' turn is written 'assistant'" if role == "model" else ""
                self.error(role_node, f"invalid role {role!r}; use one of {', '.join(ROLES)}{hint}")
                role = _INVALID
        if "content" in entries:
            content = self.string(entries["content"][1], "content", allow_empty=True)
        if role is _INVALID or content is _INVALID:
            return _INVALID
        return Message(role=role, content=content)

    def modes(self, node: yaml.Node) -> Any:
        items = self.sequence(node, "modes")
        if items is None:
            return _INVALID
        if not items:
            self.error(node, f"modes is empty; list at least one of {', '.join(MODES)}")
            return _INVALID
        modes: list[str] = []
        valid = True
        for item in items:
            mode = self.string(item, "mode", allow_empty=False)
            if mode is _INVALID:
                valid = False
            elif mode not in MODES:
                self.error(item, f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
                valid = False
            elif mode in modes:
                self.error(item, f"mode {mode!r} is listed twice")
                valid = False
            else:
                modes.append(mode)
        return modes if valid else _INVALID

    def tags(self, node: yaml.Node) -> Any:
        items = self.sequence(node, "tags")
        if items is None:
            return _INVALID
        tags = [self.string(item, "tag", allow_empty=False) for item in items]
        return _INVALID if _INVALID in tags else tags

    def sampling(self, node: yaml.Node) -> Any:
        """Return name -> (value, key node) for every key set; _INVALID values stay in place."""
        entries = self.mapping(node, "sampling", SAMPLING_KEYS)
        if entries is None:
            return _INVALID
        values: dict[str, tuple[Any, yaml.Node]] = {}
        for name, (key_node, value_node) in entries.items():
            values[name] = (self.sampling_value(name, value_node), key_node)
        return values

    def sampling_value(self, name: str, node: yaml.Node) -> Any:
        if name == "temperature":
            value = self.number(node, name)
            if value is not _INVALID and value < 0:
                self.error(node, f"temperature must be at least 0, got {node.value}")
                return _INVALID
            return value
        if name == "top_p":
            value = self.number(node, name)
            if value is not _INVALID and not 0 < value <= 1:
                self.error(node, f"top_p must be greater than 0 and at most 1, got {node.value}")
                return _INVALID
            return value
        if name == "top_k":
            value = self.integer(node, name)
            if value is not _INVALID and value != -1 and value < 1:
                self.error(node, f"top_k must be -1 (whole vocabulary) or at least 1, got {value}")
                return _INVALID
            return value
        if name == "max_tokens":
            return self.integer(node, name, minimum=1)
        if name == "n":
            return self.integer(node, name, minimum=1)
        if name == "seed":
            return self.integer(node, name, minimum=0)
        if name == "top_logprobs":
            return self.integer(node, name, minimum=0, maximum=MAX_TOP_LOGPROBS)
        if name in ("logprobs", "ignore_eos"):
            return self.boolean(node, name)
        if name == "stop":
            return self.stop(node)
        if name == "stop_token_ids":
            items = self.sequence(node, name)
            if items is None:
                return _INVALID
            ids = [self.integer(item, "stop_token_ids entry", minimum=0) for item in items]
            return _INVALID if _INVALID in ids else ids
        raise AssertionError(f"no reader for sampling key {name}")

    def stop(self, node: yaml.Node) -> Any:
        """Read ``stop`` as one string or a list of strings; always return a list."""
        if isinstance(node, yaml.SequenceNode):
            item_nodes = node.value
        elif isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            item_nodes = [node]
        else:
            self.error(node, f"stop must be a string or a list of strings, got {_describe(node)}")
            return _INVALID
        stops = []
        for item in item_nodes:
            value = self.string(item, "stop entry", allow_empty=True)
            if value == "":
                self.error(item, "stop strings must not be empty")
                value = _INVALID
            stops.append(value)
        return _INVALID if _INVALID in stops else stops


@dataclass
class _ParsedFile:
    cases: list[Case]
    errors: list[CaseError]
    ids: list[tuple[str, int, int]]


def _parse_file(path: Path) -> _ParsedFile:
    parser = _FileParser(path)
    cases = parser.parse()
    # A bad key in ``defaults:`` is seen once per case; report it once.
    unique = {(error.line, error.column, error.message): error for error in parser.errors}
    errors = sorted(unique.values(), key=lambda error: (error.line, error.column))
    return _ParsedFile(cases, errors, parser.ids)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def load_cases(path: str | Path) -> list[Case]:
    """Load the cases of one file; raise the file's first CaseError if it has any.

    ``validate_paths`` reports every error instead; neither this function nor the parser
    renders chat templates.
    """
    parsed = _parse_file(Path(path))
    if parsed.errors:
        raise parsed.errors[0]
    return parsed.cases


def find_case_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (searched recursively for *.yaml and *.yml) into case files.

    Raises CasePathError for a path that does not exist or when no case file is found.
    """
    files: list[Path] = []
    paths = [Path(p) for p in paths]
    if not paths:
        raise CasePathError("no path given; pass case files or folders of *.yaml files")
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CasePathError(f"path not found: {path}")
    if not files:
        raise CasePathError(f"no *.yaml case files found in {', '.join(str(p) for p in paths)}")
    unique = []
    for path in files:
        if path.resolve() not in (p.resolve() for p in unique):
            unique.append(path)
    return unique


def load_paths(paths: Iterable[str | Path]) -> list[Case]:
    """Load every case under ``paths``; raise the first CaseError, duplicate ids across files included."""
    cases, errors = _load_all(find_case_files(paths))
    if errors:
        raise errors[0]
    return cases


def _load_all(files: list[Path]) -> tuple[list[Case], list[CaseError]]:
    """Parse every file and add an error for each id that an earlier file already defined."""
    all_cases: list[Case] = []
    all_errors: list[CaseError] = []
    first_seen: dict[str, tuple[Path, int]] = {}
    for path in files:
        parsed = _parse_file(path)
        all_cases.extend(parsed.cases)
        all_errors.extend(parsed.errors)
        for case_id, line, column in parsed.ids:
            first = first_seen.setdefault(case_id, (path, line))
            if first[0] != path:
                message = f"duplicate case id {case_id!r}; first defined at {first[0]}:{first[1]}"
                all_errors.append(CaseError(path, line, column, message))
    return all_cases, all_errors


def check_templates(cases: list[Case], model_dir: str | Path) -> list[CaseError]:
    """Render each case's messages with the chat template of ``model_dir``.

    A template that raises (Gemma's rejects roles that do not alternate user/assistant)
    becomes a CaseError at the case's ``messages:`` key. A stop token id outside the
    tokenizer's vocabulary becomes one at ``stop_token_ids:``.
    """
    from harness.reference import ChatTemplateError, load_tokenizer, render_prompt

    tokenizer = load_tokenizer(model_dir)
    vocab_size = len(tokenizer)
    errors = []
    for case in cases:
        try:
            render_prompt(tokenizer, case.messages, add_generation_prompt=True)
        except ChatTemplateError as error:
            line, column = case.locations.get("messages", (case.line, 1))
            errors.append(
                CaseError(
                    case.path,
                    line,
                    column,
                    f"the chat template of {model_dir} rejects the messages of case {case.id!r}: {error.reason}",
                )
            )
        outside = [token_id for token_id in case.sampling.stop_token_ids if token_id >= vocab_size]
        if outside:
            line, column = case.locations.get("sampling.stop_token_ids", (case.line, 1))
            errors.append(
                CaseError(
                    case.path,
                    line,
                    column,
                    f"stop_token_ids {outside} are outside the vocabulary of {model_dir} ({vocab_size} ids)",
                )
            )
    return errors


def default_model_dir() -> Path | None:
    """Return the Gemma fixture folder if it is built, else None."""
    from harness.fixture import FixtureError, check_model_dir, default_fixture_dir

    try:
        folder = default_fixture_dir()
        check_model_dir(folder)
    except (FixtureError, ImportError) as error:
        log.info("the Gemma fixture is not available (%s)", error)
        return None
    return folder


def validate_paths(
    paths: Iterable[str | Path], model_dir: str | Path | None = None, check_template: bool = True
) -> list[CaseError]:
    """Validate every case file under ``paths`` and return all errors, sorted by file and line.

    With ``check_template``, messages are also rendered with a chat template: that of
    ``model_dir`` for every case, or, when ``model_dir`` is None, that of the built Gemma
    fixture for the cases whose model is the fixture's served name. Without a model folder
    the template check is skipped with a warning. Raises CasePathError for a missing path
    or when no case file is found, and FixtureError for an unusable ``model_dir``.
    """
    _, errors = _validate_files(find_case_files(paths), model_dir, check_template)
    return errors


def _validate_files(
    files: list[Path], model_dir: str | Path | None, check_template: bool
) -> tuple[list[Case], list[CaseError]]:
    cases, errors = _load_all(files)

    if check_template:
        # Only valid cases are rendered: the loader drops a case with schema errors.
        checkable = cases
        if model_dir is not None:
            from harness.fixture import check_model_dir

            check_model_dir(Path(model_dir))
            errors.extend(check_templates(checkable, model_dir))
        else:
            from harness.fixture import SERVED_MODEL_NAME

            gemma_cases = [case for case in checkable if case.model == SERVED_MODEL_NAME]
            fixture_dir = default_model_dir() if gemma_cases else None
            if gemma_cases and fixture_dir is None:
                log.warning(
                    "chat templates not checked: the Gemma fixture is not built; "
                    "run 'python -m harness fixture build' or pass --model-dir"
                )
            elif gemma_cases:
                errors.extend(check_templates(gemma_cases, fixture_dir))

    order = {str(path): index for index, path in enumerate(files)}
    errors.sort(key=lambda error: (order.get(error.path, len(order)), error.line, error.column))
    return cases, errors


def main_validate(argv: list[str]) -> int:
    """Run ``python -m harness validate PATH...``; exit 0 valid, 1 invalid cases, 2 usage error."""
    import argparse

    from harness.fixture import FixtureError

    parser = argparse.ArgumentParser(
        prog="python -m harness validate",
        description="Check case files and print every error as FILE:LINE:COLUMN: message.",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="case file, or folder searched for *.yaml files")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="render every case with this model folder's chat template (default: the Gemma fixture, if built, "
        "for the cases of its model)",
    )
    parser.add_argument("--no-template-check", action="store_true", help="check the schema only")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return 0 if exit_request.code == 0 else 2
    if not args.paths:
        print("error: no PATH given; pass case files or folders of *.yaml files", file=sys.stderr)
        return 2

    try:
        files = find_case_files(args.paths)
        cases, errors = _validate_files(files, args.model_dir, check_template=not args.no_template_check)
    except CasePathError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FixtureError as error:
        print(f"error: --model-dir: {error}", file=sys.stderr)
        return 2

    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        invalid_files = len({error.path for error in errors})
        noun = "error" if len(errors) == 1 else "errors"
        print(f"{len(errors)} {noun} in {invalid_files} of {len(files)} case files", file=sys.stderr)
        return 1
    print(f"{len(files)} case files, {len(cases)} cases: all valid")
    return 0
