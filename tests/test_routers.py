"""Router releases: spec parsing, command lines, installs, the Harmony vocabulary, real starts."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import requests

from fake_scheduler import FakeScheduler
from harness.fixture import default_fixture_dir
from harness.stacks import routers
from harness.stacks.process import ManagedProcess, free_port
from harness.stacks.routers import RouterInstallError, RouterRelease, convert_quicktok_vocab
from harness.stacks.waiting import ChatSucceeds, HttpOk, WorkerListed
from harness.tap import Tap

RELEASES = ["sglang-router==0.3.2", "smg==1.13.0"]
SERVED_MODEL_NAME = "google/gemma-3-270m-it"
# The fixture folder's files the router reads for its tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                   "generation_config.json")


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture()
def no_install(cache_dir, monkeypatch):
    """Replace the installers with stubs that record calls, so command tests need no network."""
    installs: list[str] = []

    def fake_install(self: RouterRelease, venv: Path, python: Path) -> None:
        installs.append(self.spec)
        time.sleep(0.2)
        python.parent.mkdir(parents=True)
        python.write_text("")

    vocab = cache_dir / "tiktoken" / routers.HARMONY_VOCAB_NAME
    monkeypatch.setattr(RouterRelease, "_install", fake_install)
    monkeypatch.setattr(routers, "ensure_harmony_vocab", lambda: vocab)
    return installs


# -- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, package, version, canonical", [
    ("sglang-router==0.3.2", "sglang-router", "0.3.2", "sglang-router==0.3.2"),
    ("sglang_router==0.3.2", "sglang-router", "0.3.2", "sglang-router==0.3.2"),
    ("smg==1.13.0", "smg", "1.13.0", "smg==1.13.0"),
    (" smg==1.13.0rc1 ", "smg", "1.13.0rc1", "smg==1.13.0rc1"),
])
def test_parse_valid_specs(spec, package, version, canonical):
    release = RouterRelease.parse(spec)

    assert release.package.name == package
    assert release.version == version
    assert release.spec == canonical
    assert release.installed is False


def test_parse_installed():
    release = RouterRelease.parse("installed")

    assert release.installed is True
    assert release.package is None


@pytest.mark.parametrize("spec", ["smg", "smg>=1.0", "vllm==0.1", "sglang-router==", "==1.0", ""])
def test_parse_invalid_specs(spec):
    with pytest.raises(ValueError, match="invalid router release"):
        RouterRelease.parse(spec)


# -- command and environment ------------------------------------------------------------------------


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("spec, module", [("sglang-router==0.3.2", "sglang_router.launch_router"),
                                          ("smg==1.13.0", "smg.launch_router")])
def test_command_per_release(spec, module, no_install, cache_dir):
    release = RouterRelease.parse(spec)
    argv = release.command("grpc", "127.0.0.1:5000", "127.0.0.1", 8000, 29001, "/models/gemma", "/models/tok",
                           log_dir="/tmp/router-logs", extra=["--max-payload-size", "1024"])

    assert argv[0] == str(cache_dir / "routers" / spec / "bin" / "python")
    assert argv[1:3] == ["-m", module]
    assert flag_value(argv, "--worker-urls") == "grpc://127.0.0.1:5000"
    assert flag_value(argv, "--host") == "127.0.0.1"
    assert flag_value(argv, "--port") == "8000"
    assert flag_value(argv, "--prometheus-port") == "29001"
    assert flag_value(argv, "--prometheus-host") == "127.0.0.1"
    assert flag_value(argv, "--model-path") == "/models/gemma"
    assert flag_value(argv, "--tokenizer-path") == "/models/tok"
    assert flag_value(argv, "--log-dir") == "/tmp/router-logs"
    assert flag_value(argv, "--policy") == "round_robin"
    assert argv[-2:] == ["--max-payload-size", "1024"]


def test_command_http_mode_scheme(no_install):
    release = RouterRelease.parse("smg==1.13.0")

    argv = release.command("http", "127.0.0.1:5000", "127.0.0.1", 8000, 29001, None, None)

    assert flag_value(argv, "--worker-urls") == "http://127.0.0.1:5000"
    assert "--model-path" not in argv
    assert "--tokenizer-path" not in argv
    assert "--log-dir" not in argv


def test_command_rejects_mismatched_scheme(no_install):
    release = RouterRelease.parse("smg==1.13.0")

    with pytest.raises(ValueError, match="does not match grpc mode"):
        release.command("grpc", "http://127.0.0.1:5000", "127.0.0.1", 8000, 29001, None, None)
    with pytest.raises(ValueError, match="invalid router mode"):
        release.command("zmq", "127.0.0.1:5000", "127.0.0.1", 8000, 29001, None, None)


def test_env_points_every_release_at_vocab(no_install, cache_dir):
    expected = {"TIKTOKEN_ENCODINGS_BASE": str(cache_dir / "tiktoken")}
    assert RouterRelease.parse("sglang-router==0.3.2").env() == expected
    # smg 1.1.0 to 1.8.0 panic without the vocabulary, like sglang-router 0.3.2.
    assert RouterRelease.parse("smg==1.5.0").env() == expected


def test_installed_without_router(monkeypatch):
    monkeypatch.setattr(routers.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(RouterInstallError, match="no router package is importable"):
        RouterRelease.parse("installed").ensure()


# -- installs -------------------------------------------------------------------------------------


def test_unfinished_venv_is_redone(no_install, cache_dir):
    release = RouterRelease.parse("smg==1.13.0")
    leftover = release.venv_dir / "half-written-file"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("from an interrupted install")

    python = release.ensure()

    assert no_install == ["smg==1.13.0"]
    assert not leftover.exists()
    assert python == release.venv_dir / "bin" / "python"
    assert (release.venv_dir / ".harness-install-complete").is_file()


def test_complete_venv_not_reinstalled(no_install):
    RouterRelease.parse("smg==1.13.0").ensure()
    RouterRelease.parse("smg==1.13.0").ensure()

    assert no_install == ["smg==1.13.0"]


def test_concurrent_ensure_installs_once(no_install):
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            RouterRelease.parse("sglang-router==0.3.2").ensure()
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert no_install == ["sglang-router==0.3.2"]


@pytest.mark.slow
def test_nonexistent_release_one_line_error(cache_dir):
    release = RouterRelease.parse("smg==0.0.0.1")

    with pytest.raises(RouterInstallError) as raised:
        release.ensure()

    assert str(raised.value) == "router release smg==0.0.0.1 not found on the package index"
    assert raised.value.exit_code == 2
    assert not release.venv_dir.exists()


# -- the Harmony vocabulary -----------------------------------------------------------------------


def quicktok_bytes(tokens: list[tuple[bytes, int]]) -> bytes:
    data = struct.pack("<I", len(tokens))
    for token, rank in tokens:
        data += struct.pack("<H", len(token)) + token + struct.pack("<I", rank)
    return data


def test_convert_quicktok_lines():
    tokens = [(b"!", 0), (b"\xff\x00 ab", 1), (b"hello", 70000)]

    text = convert_quicktok_vocab(quicktok_bytes(tokens)).decode()

    assert text.splitlines() == [
        f"{base64.b64encode(token).decode()} {rank}" for token, rank in tokens]
    assert text.endswith("\n")


@pytest.mark.parametrize("cut", [1, 3])
def test_convert_quicktok_truncated(cut):
    data = quicktok_bytes([(b"abc", 0), (b"de", 1)])

    with pytest.raises(ValueError):
        convert_quicktok_vocab(data[:-cut])


def test_convert_quicktok_trailing_bytes():
    with pytest.raises(ValueError, match="2 bytes after its 1 tokens"):
        convert_quicktok_vocab(quicktok_bytes([(b"a", 0)]) + b"xx")


@pytest.mark.slow
def test_harmony_vocab_sha256(cache_dir):
    path = routers.ensure_harmony_vocab()

    assert path == cache_dir / "tiktoken" / "o200k_base.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == routers.HARMONY_VOCAB_SHA256
    assert len(path.read_text().splitlines()) == 199998


# -- real releases in front of fake workers ---------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """Copy the fixture folder's tokenizer files (no weights), building the fixture when missing."""
    fixture = default_fixture_dir()
    if not all((fixture / name).is_file() for name in TOKENIZER_FILES):
        from harness.fixture import build_fixture

        fixture = build_fixture()
    target = tmp_path_factory.mktemp("tokenizer")
    for name in TOKENIZER_FILES:
        shutil.copy(fixture / name, target / name)
    return target


class FakeHttpWorker(http.server.BaseHTTPRequestHandler):
    """The parts of sglang's HTTP API a router calls to register a worker and route chat."""

    paths: list[str] = []

    def _send_json(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:
        self.paths.append(f"GET {self.path}")
        if self.path in ("/health", "/health_generate"):
            self._send_json(200, {})
        elif self.path in ("/model_info", "/get_model_info"):
            self._send_json(200, {"model_path": SERVED_MODEL_NAME, "tokenizer_path": SERVED_MODEL_NAME,
                                  "is_generation": True, "served_model_name": SERVED_MODEL_NAME})
        elif self.path in ("/server_info", "/get_server_info"):
            self._send_json(200, {"model_path": SERVED_MODEL_NAME, "served_model_name": SERVED_MODEL_NAME,
                                  "version": "0.5.7", "tp_size": 1, "dp_size": 1})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": SERVED_MODEL_NAME, "object": "model"}]})
        else:
            self._send_json(404, {"error": f"no route {self.path}"})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.paths.append(f"POST {self.path}")
        if self.path == "/v1/chat/completions":
            request = json.loads(body)
            self._send_json(200, {
                "id": "fake-1", "object": "chat.completion", "created": 0, "model": request.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "blue"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 14, "completion_tokens": 1, "total_tokens": 15},
            })
        else:
            self._send_json(404, {"error": f"no route {self.path}"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def fake_http_worker():
    FakeHttpWorker.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHttpWorker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_router(release: RouterRelease, mode: str, worker_url: str, tokenizer_dir: Path | None,
                 log_path: Path) -> tuple[ManagedProcess, str]:
    port, prometheus_port = free_port(), free_port()
    argv = release.command(mode, worker_url, "127.0.0.1", port, prometheus_port,
                           str(tokenizer_dir) if tokenizer_dir else None,
                           str(tokenizer_dir) if tokenizer_dir else None)
    router = ManagedProcess(f"router-{mode}", argv, release.env(), log_path)
    router.start()
    return router, f"http://127.0.0.1:{port}"


def assert_stopped(router: ManagedProcess) -> None:
    started = time.monotonic()
    router.stop(timeout=10)
    assert time.monotonic() - started < 15
    assert not pid_alive(router.pid)
    assert not router.group_alive()


@pytest.mark.slow
@pytest.mark.parametrize("spec", RELEASES)
def test_release_grpc_mode(spec, tokenizer_dir, tmp_path):
    release = RouterRelease.parse(spec)
    release.ensure()
    with FakeScheduler(model_path=str(tokenizer_dir)) as fake, \
            Tap("127.0.0.1:0", fake.address, tmp_path / "wire.jsonl") as tap:
        router, base = start_router(release, "grpc", f"grpc://{tap.address}", tokenizer_dir, tmp_path / "router.log")
        try:
            HttpOk(base + "/health", component=f"{spec} in gRPC mode").wait(router, 120)
            WorkerListed(base, f"grpc://{tap.address}", component=f"{spec} in gRPC mode").wait(router, 120)
            ChatSucceeds(base, SERVED_MODEL_NAME, component=f"{spec} in gRPC mode").wait(router, 120)
            mark = tap.record_count
            response = requests.post(base + "/v1/chat/completions", timeout=60, json={
                "model": SERVED_MODEL_NAME, "messages": [{"role": "user", "content": "Why sky is blue?"}],
                "temperature": 0.7, "max_tokens": 512})
            records = tap.records_since(mark, wait_s=5)
        finally:
            assert_stopped(router)

    assert response.status_code == 200
    assert len(records) == 1
    record = records[0]
    prompt_ids = record.request.prompt_ids
    # Whatever the release sends, the record is what reached the server, and usage counts it.
    assert fake.requests[record.request.request_id]
    assert prompt_ids[-3:] == [105, 4368, 107], "the prompt must end with the generation prompt"
    assert 11355 in prompt_ids, "the user text 'Why' must be in the prompt"
    assert response.json()["usage"]["prompt_tokens"] == len(prompt_ids)
    assert record.request.sampling_params["max_new_tokens"] == 512
    assert record.completions[0].finish_reason == "stop"
    print(f"{spec} sent prompt ids {prompt_ids}")


@pytest.mark.slow
@pytest.mark.parametrize("spec", RELEASES)
def test_release_http_mode(spec, tokenizer_dir, fake_http_worker, tmp_path):
    release = RouterRelease.parse(spec)
    release.ensure()
    router, base = start_router(release, "http", fake_http_worker, tokenizer_dir, tmp_path / "router.log")
    try:
        WorkerListed(base, fake_http_worker, component=f"{spec} in HTTP mode").wait(router, 120)
        ChatSucceeds(base, SERVED_MODEL_NAME, component=f"{spec} in HTTP mode").wait(router, 120)
    finally:
        assert_stopped(router)

    assert "POST /v1/chat/completions" in FakeHttpWorker.paths
    print(f"{spec} called the HTTP worker: {sorted(set(FakeHttpWorker.paths))}")
    assert any(path.startswith("GET /health") for path in FakeHttpWorker.paths)

