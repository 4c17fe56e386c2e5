"""The Docker stack: container and exec specifications, the reaper, pre-start errors, a live run.

No Docker engine runs on the machines this suite was written on, so a fake client stands in
for the engine. The live test probes for an engine and a GPU, and is skipped with the probe's
reason when either is missing.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from docker.utils import format_environment

from harness.stacks import docker as docker_stack
from harness.stacks.base import StackError
from harness.stacks.docker import (
    CONTAINER_HF_CACHE,
    CONTAINER_LOG_DIR,
    CONTAINER_MODEL_DIR,
    OWNER_LABEL,
    RUN_ID_LABEL,
    ContainerProcess,
    DockerStack,
    check_gpu,
    connect,
    container_spec,
    gated_model_message,
    logged_command,
    mask_secrets,
    owner_alive,
    owner_label,
    probe_docker_gpu,
    reap_containers,
    router_command,
    router_install_command,
    router_probe_command,
    server_command,
)
from harness.stacks.process import current_run_id
from harness.stacks.routers import ROUTER_PACKAGES, RouterRelease

TOKEN = "hf_TestTokenValue1234567890abcdef"

# The user report's server command, with the model and port as placeholders.
REPORT_SERVER_COMMAND = (
    "python3 -m sglang.launch_server --model-path M --tokenizer-path M --grpc-mode "
    "--attention-backend flashinfer --dtype bfloat16 --context-length 2048 --mem-fraction-static 0.1 "
    "--max-total-tokens 2048 --max-prefill-tokens 512 --trust-remote-code --log-level info "
    "--host 0.0.0.0 --port P"
)


def _report_command(model: str, port: int, grpc: bool) -> list[str]:
    placeholders = {"M": model, "P": str(port)}
    argv = [placeholders.get(arg, arg) for arg in shlex.split(REPORT_SERVER_COMMAND)]
    if not grpc:
        argv.remove("--grpc-mode")
    return argv


def _spec(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    arguments = dict(
        image="lmsysorg/sglang:v0.5.7-runtime",
        run_id="20250101-000000-1-abcdef",
        owner="box 123 456",
        hf_cache_dir=tmp_path / "hf",
        log_dir=tmp_path / "logs",
    )
    arguments.update(overrides)
    return container_spec(**arguments)


# -- container spec --------------------------------------------------------------------------------


def test_container_spec_matches_report(tmp_path):
    spec = _spec(tmp_path)
    assert spec["image"] == "lmsysorg/sglang:v0.5.7-runtime"
    assert spec["command"] == "bash"
    # -itd
    assert spec["detach"] is True
    assert spec["tty"] is True
    assert spec["stdin_open"] is True
    assert spec["runtime"] == "nvidia"


def test_container_spec_requests_all_gpus(tmp_path):
    (request,) = _spec(tmp_path)["device_requests"]
    assert request["Count"] == -1
    assert request["Capabilities"] == [["gpu"]]


def test_container_spec_mounts(tmp_path):
    volumes = _spec(tmp_path)["volumes"]
    assert volumes[str(tmp_path / "hf")] == {"bind": CONTAINER_HF_CACHE, "mode": "rw"}
    assert CONTAINER_HF_CACHE == "/root/.cache/huggingface"
    assert volumes[str(tmp_path / "logs")] == {"bind": CONTAINER_LOG_DIR, "mode": "rw"}
    assert len(volumes) == 2


def test_container_spec_mounts_model_read_only(tmp_path):
    volumes = _spec(tmp_path, model_dir=tmp_path / "model")["volumes"]
    assert volumes[str(tmp_path / "model")] == {"bind": CONTAINER_MODEL_DIR, "mode": "ro"}


def test_container_spec_uses_host_network(tmp_path):
    spec = _spec(tmp_path)
    assert spec["network_mode"] == "host"
    # Under host networking the engine discards published ports, so none are given.
    assert "ports" not in spec


def test_container_spec_labels_run(tmp_path):
    spec = _spec(tmp_path)
    assert spec["labels"] == {RUN_ID_LABEL: "20250101-000000-1-abcdef", OWNER_LABEL: "box 123 456"}
    assert "20250101-000000-1-abcdef" in spec["name"]
    assert spec["environment"]["HARNESS_RUN_ID"] == "20250101-000000-1-abcdef"


def test_container_spec_passes_hf_token(tmp_path):
    spec = _spec(tmp_path, hf_token=TOKEN)
    assert spec["environment"]["HF_TOKEN"] == TOKEN
    # What the Docker SDK sends to the engine carries the real value.
    assert f"HF_TOKEN={TOKEN}" in format_environment(spec["environment"])


def test_container_spec_repr_masks_token(tmp_path):
    spec = _spec(tmp_path, hf_token=TOKEN)
    assert TOKEN not in repr(spec)
    assert TOKEN not in str(spec)
    assert "'***'" in repr(spec["environment"])


def test_container_spec_logging_masks_token(tmp_path, caplog):
    spec = _spec(tmp_path, hf_token=TOKEN)
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("spec: %s", spec)
        logging.getLogger("test").info("env: %r", spec["environment"])
    assert TOKEN not in caplog.text
    assert "***" in caplog.text


def test_container_spec_without_token(tmp_path):
    assert "HF_TOKEN" not in _spec(tmp_path)["environment"]
    assert "HF_TOKEN" not in _spec(tmp_path, hf_token="")["environment"]


def test_mask_secrets_replaces_every_occurrence():
    text = f"token {TOKEN} and again {TOKEN}"
    assert mask_secrets(text, [TOKEN]) == "token *** and again ***"
    assert mask_secrets(text, [None, ""]) == text


# -- exec commands -------------------------------------------------------------------------------


def test_server_command_grpc_is_report_command():
    assert server_command("google/gemma-3-270m-it", 30000, grpc=True) == _report_command(
        "google/gemma-3-270m-it", 30000, grpc=True)


def test_server_command_http_drops_only_grpc_mode():
    grpc = server_command("google/gemma-3-270m-it", 30001, grpc=True)
    http = server_command("google/gemma-3-270m-it", 30001, grpc=False)
    assert http == _report_command("google/gemma-3-270m-it", 30001, grpc=False)
    assert [arg for arg in grpc if arg != "--grpc-mode"] == http


def test_server_command_binds_given_host():
    argv = server_command("m", 1234, grpc=True, host="127.0.0.1")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "1234"


def test_server_command_served_name_only_when_given():
    assert "--served-model-name" not in server_command("m", 1, grpc=True)
    argv = server_command(CONTAINER_MODEL_DIR, 1, grpc=True, served_model_name="google/gemma-3-270m-it")
    assert argv[-2:] == ["--served-model-name", "google/gemma-3-270m-it"]
    assert argv[argv.index("--model-path") + 1] == CONTAINER_MODEL_DIR


def test_router_command_grpc_mode():
    argv = router_command(ROUTER_PACKAGES["sglang-router"], "grpc", "grpc://127.0.0.1:40000",
                          "google/gemma-3-270m-it", "127.0.0.1", 40001, 40002)
    assert argv == [
        "python3", "-m", "sglang_router.launch_router",
        "--worker-urls", "grpc://127.0.0.1:40000",
        "--model-path", "google/gemma-3-270m-it",
        "--tokenizer-path", "google/gemma-3-270m-it",
        "--policy", "cache_aware",
        "--host", "127.0.0.1",
        "--port", "40001",
        "--prometheus-host", "127.0.0.1",
        "--prometheus-port", "40002",
        "--log-level", "info",
    ]


def test_router_command_uses_package_module():
    argv = router_command(ROUTER_PACKAGES["smg"], "http", "http://127.0.0.1:1", "m", "127.0.0.1", 2, 3)
    assert argv[:3] == ["python3", "-m", "smg.launch_router"]
    assert argv[argv.index("--worker-urls") + 1] == "http://127.0.0.1:1"


def test_router_command_rejects_scheme_mismatch():
    with pytest.raises(ValueError, match="does not match grpc mode"):
        router_command(ROUTER_PACKAGES["smg"], "grpc", "http://127.0.0.1:1", "m", "127.0.0.1", 2, 3)
    with pytest.raises(ValueError, match="invalid router mode"):
        router_command(ROUTER_PACKAGES["smg"], "tcp", "tcp://127.0.0.1:1", "m", "127.0.0.1", 2, 3)


def test_router_install_command():
    assert router_install_command(RouterRelease.parse("installed")) is None
    argv = router_install_command(RouterRelease.parse("smg==1.13.0"))
    assert argv[:4] == ["python3", "-m", "pip", "install"]
    assert argv[-1] == "smg==1.13.0"


def test_logged_command_appends_output_and_keeps_exit_code(tmp_path):
    log_path = tmp_path / "dir with space" / "server.log"
    log_path.parent.mkdir()
    log_path.write_text("earlier line\n")
    argv = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]
    result = subprocess.run(logged_command(argv, str(log_path)), capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert result.stdout == ""
    assert log_path.read_text().splitlines() == ["earlier line", "out", "err"]


def _fake_distribution(root: Path, name: str, module: str, version: str) -> None:
    """Write an importable top-level package and its metadata, as pip would install them."""
    (root / module).mkdir()
    (root / module / "__init__.py").write_text("")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _run_probe(site: Path) -> list[str]:
    argv = router_probe_command()
    assert argv[:2] == ["python3", "-c"]
    # -I -S: no site-packages and no environment, so only the packages under ``site`` exist.
    code = f"import sys; sys.path.insert(0, {str(site)!r}); exec({argv[2]!r})"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_router_probe_finds_smg(tmp_path):
    _fake_distribution(tmp_path, "smg", "smg", "9.8.7")
    assert _run_probe(tmp_path) == ["smg", "9.8.7"]


def test_router_probe_prefers_sglang_router(tmp_path):
    _fake_distribution(tmp_path, "smg", "smg", "9.8.7")
    _fake_distribution(tmp_path, "sglang-router", "sglang_router", "0.3.1")
    assert _run_probe(tmp_path) == ["sglang-router", "0.3.1"]


def test_router_probe_prints_nothing_without_router(tmp_path):
    assert _run_probe(tmp_path) == []


# -- pre-start checks ------------------------------------------------------------------------------


class _PingFails:
    def ping(self):
        raise ConnectionError("Error while fetching server API version: ('Connection aborted.',\n FileNotFoundError(2))")


def test_connect_without_engine_is_one_line():
    with pytest.raises(StackError) as raised:
        connect(_PingFails())
    message = str(raised.value)
    assert message.startswith("no Docker engine reachable: ")
    assert "\n" not in message
    assert "Connection aborted" in message


def test_connect_real_sdk_without_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(StackError, match="^no Docker engine reachable: "):
        connect()


def test_check_gpu_without_nvidia_runtime():
    with pytest.raises(StackError) as raised:
        check_gpu({"Runtimes": {"runc": {}, "io.containerd.runc.v2": {}}}, "/usr/bin/nvidia-smi")
    message = str(raised.value)
    assert message.startswith("no GPU: the Docker engine has no nvidia runtime")
    assert "runc" in message
    assert "\n" not in message


def test_check_gpu_without_nvidia_smi():
    with pytest.raises(StackError) as raised:
        check_gpu({"Runtimes": {"nvidia": {}, "runc": {}}}, None)
    assert str(raised.value).startswith("no GPU: nvidia-smi is not on PATH")
    assert "\n" not in str(raised.value)


def test_check_gpu_passes_with_runtime_and_driver():
    check_gpu({"Runtimes": {"nvidia": {}, "runc": {}}}, "/usr/bin/nvidia-smi")


GATED_LOG = """\
[2025-01-01 00:00:01] server_args=ServerArgs(model_path='google/gemma-3-270m-it', ...)
huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: Root=1-abc)
Cannot access gated repo for url https://huggingface.co/google/gemma-3-270m-it/resolve/main/config.json.
Access to model google/gemma-3-270m-it is restricted. You must have access to it and be authenticated to access it.
"""


def test_gated_model_without_token_says_set_hf_token():
    message = gated_model_message(GATED_LOG, "google/gemma-3-270m-it", hf_token_set=False)
    assert message is not None
    assert "set HF_TOKEN" in message
    assert "google/gemma-3-270m-it" in message
    assert "\n" not in message


def test_gated_model_with_token_says_token_refused():
    message = gated_model_message(GATED_LOG, "google/gemma-3-270m-it", hf_token_set=True)
    assert message is not None
    assert "HF_TOKEN given" in message


def test_gated_model_not_reported_for_other_failures():
    log_text = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    assert gated_model_message(log_text, "m", hf_token_set=False) is None


# -- reaper ------------------------------------------------------------------------------------------


class FakeContainer:
    def __init__(self, name: str, labels: dict[str, str]):
        self.name = name
        self.id = f"id-{name}"
        self.labels = labels
        self.removed = False
        self.exec_calls: list[list[str]] = []

    def remove(self, force: bool = False):
        assert force, "containers are removed with force=True, which also kills their processes"
        self.removed = True

    def exec_run(self, argv):
        self.exec_calls.append(list(argv))
        return SimpleNamespace(exit_code=0, output=b"")


class FakeContainers:
    def __init__(self, containers: list[FakeContainer]):
        self.containers = containers
        self.list_filters: list[dict] = []

    def list(self, all: bool = False, filters: dict | None = None):
        assert all, "stopped containers of dead runs must be listed too"
        self.list_filters.append(filters or {})
        label = (filters or {}).get("label")
        return [c for c in self.containers if label is None or label in c.labels]


def _dead_owner_label() -> str:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        label = owner_label(child.pid)
    finally:
        child.kill()
        child.wait()
    return label


def test_owner_alive_for_this_process():
    assert owner_alive(owner_label())


def test_owner_alive_false_after_exit():
    assert not owner_alive(_dead_owner_label())


def test_owner_alive_false_for_reused_pid():
    host, pid, _ = owner_label().split()
    assert not owner_alive(f"{host} {pid} 1")


def test_owner_alive_other_host_counts_as_alive():
    _, pid, start = _dead_owner_label().split()
    assert owner_alive(f"other-{socket.gethostname()} {pid} {start}")


def test_owner_alive_false_for_malformed_label():
    assert not owner_alive("")
    assert not owner_alive("host notapid 5")


def test_reap_removes_dead_runs_only():
    dead = _dead_owner_label()
    containers = {
        "current": FakeContainer("current", {RUN_ID_LABEL: "run-now", OWNER_LABEL: dead}),
        "dead": FakeContainer("dead", {RUN_ID_LABEL: "run-dead", OWNER_LABEL: dead}),
        "live": FakeContainer("live", {RUN_ID_LABEL: "run-live", OWNER_LABEL: owner_label()}),
        "unlabelled-owner": FakeContainer("unlabelled-owner", {RUN_ID_LABEL: "run-old"}),
        "someone-elses": FakeContainer("someone-elses", {"purpose": "dev"}),
    }
    client = SimpleNamespace(containers=FakeContainers(list(containers.values())))

    removed = reap_containers(client, current_run="run-now")

    assert sorted(removed) == ["dead", "unlabelled-owner"]
    assert containers["dead"].removed
    assert containers["unlabelled-owner"].removed
    assert not containers["current"].removed
    assert not containers["live"].removed
    assert not containers["someone-elses"].removed
    assert client.containers.list_filters == [{"label": RUN_ID_LABEL}]


def test_reap_continues_after_remove_error():
    dead = _dead_owner_label()

    class RemoveFails(FakeContainer):
        def remove(self, force: bool = False):
            raise RuntimeError("removal of container in progress")

    first = RemoveFails("first", {RUN_ID_LABEL: "a", OWNER_LABEL: dead})
    second = FakeContainer("second", {RUN_ID_LABEL: "b", OWNER_LABEL: dead})
    client = SimpleNamespace(containers=FakeContainers([first, second]))
    assert reap_containers(client, current_run="now") == ["second"]


# -- exec'd processes -----------------------------------------------------------------------------


class FakeApi:
    """The low-level exec calls of docker.APIClient. Each exec "runs" by writing its log file.

    ``outputs`` maps a process name (taken from its log file name) to the text it writes and
    its exit code. A process whose name is not listed runs until the test ends.
    """

    def __init__(self, host_log_dir: Path, outputs: dict[str, tuple[str, int]]):
        self.host_log_dir = host_log_dir
        self.outputs = outputs
        self.commands: dict[str, list[str]] = {}
        self.names: dict[str, str] = {}

    def exec_create(self, container_id, cmd, **kwargs):
        exec_id = f"exec-{len(self.commands)}"
        self.commands[exec_id] = list(cmd)
        assert cmd[:2] == ["bash", "-c"], "every background exec writes its output to a log file"
        log_path = shlex.split(cmd[2])[-2]
        assert log_path.startswith(CONTAINER_LOG_DIR + "/")
        self.names[exec_id] = Path(log_path).stem
        return {"Id": exec_id}

    def exec_start(self, exec_id, detach=False):
        assert detach
        name = self.names[exec_id]
        if name in self.outputs:
            with open(self.host_log_dir / f"{name}.log", "a") as log_file:
                log_file.write(self.outputs[name][0])

    def exec_inspect(self, exec_id):
        name = self.names[exec_id]
        if name in self.outputs:
            return {"Running": False, "ExitCode": self.outputs[name][1]}
        return {"Running": True, "ExitCode": 0}


def test_container_process_exit_and_masked_tail(tmp_path):
    api = FakeApi(tmp_path, {"server-grpc": (f"loading\nusing token {TOKEN}\nfailed\n", 1)})
    process = ContainerProcess(api, "cid", "server-grpc", ["python3", "-m", "x"], tmp_path / "server-grpc.log",
                               f"{CONTAINER_LOG_DIR}/server-grpc.log", secrets=[TOKEN])
    process.start()
    assert not process.alive()
    assert process.returncode == 1
    tail = process.log_tail(2)
    assert tail == "using token ***\nfailed\n"
    assert process.wait_exit(5) == 1


def test_container_process_exec_failure_is_stack_error(tmp_path):
    class ExecFails(FakeApi):
        def exec_create(self, container_id, cmd, **kwargs):
            raise RuntimeError("409 Client Error: container abc is not running")

    process = ContainerProcess(ExecFails(tmp_path, {}), "abcdef0123456789", "server-http", ["python3"],
                               tmp_path / "server-http.log", f"{CONTAINER_LOG_DIR}/server-http.log")
    with pytest.raises(StackError) as raised:
        process.start()
    assert str(raised.value) == (
        "starting server-http in container abcdef012345 failed: 409 Client Error: container abc is not running")


def test_container_process_running_has_no_returncode(tmp_path):
    api = FakeApi(tmp_path, {})
    process = ContainerProcess(api, "cid", "router-grpc", ["python3"], tmp_path / "router-grpc.log",
                               f"{CONTAINER_LOG_DIR}/router-grpc.log")
    process.start()
    assert process.alive()
    assert process.returncode is None
    with pytest.raises(StackError, match="router-grpc did not finish within 0 s"):
        process.wait_exit(0)


# -- DockerStack with a fake engine ----------------------------------------------------------------


class FakeClient:
    """A Docker client whose one container runs the given exec outputs (see FakeApi)."""

    def __init__(self, outputs: dict[str, tuple[str, int]], runtimes=("nvidia", "runc"), ping_error=None):
        self.outputs = outputs
        self.runtimes = runtimes
        self.ping_error = ping_error
        self.run_calls: list[dict[str, Any]] = []
        self.container: FakeContainer | None = None
        self.api: FakeApi | None = None
        self.containers = self
        self.images = SimpleNamespace(get=lambda name: SimpleNamespace(id="sha256:feed"))

    def ping(self):
        if self.ping_error:
            raise self.ping_error
        return True

    def info(self):
        return {"Runtimes": {name: {} for name in self.runtimes}}

    def list(self, all=False, filters=None):
        return []

    def run(self, **spec):
        self.run_calls.append(spec)
        log_dir = next(Path(host) for host, bind in spec["volumes"].items() if bind["bind"] == CONTAINER_LOG_DIR)
        self.api = FakeApi(log_dir, self.outputs)
        self.container = FakeContainer(spec["name"], spec["labels"])
        self.container.exec_run = self._exec_run
        return self.container

    def _exec_run(self, argv):
        self.container.exec_calls.append(list(argv))
        if argv[:2] == ["python3", "-c"] and "find_spec" in argv[2]:
            return SimpleNamespace(exit_code=0, output=b"sglang-router 0.3.1\n")
        return SimpleNamespace(exit_code=0, output=b"")


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(docker_stack.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(docker_stack, "SERVER_START_TIMEOUT_S", 2.0)
    return tmp_path


def test_stack_start_without_engine(tmp_path):
    stack = DockerStack(router="installed", run_dir=tmp_path, client=FakeClient({}, ping_error=ConnectionError("refused")))
    with pytest.raises(StackError, match="^no Docker engine reachable: refused"):
        with stack:
            pass


def test_stack_start_without_gpu(tmp_path, monkeypatch):
    client = FakeClient({}, runtimes=("runc",))
    with pytest.raises(StackError, match="^no GPU: the Docker engine has no nvidia runtime"):
        with DockerStack(router="installed", run_dir=tmp_path, client=client):
            pass
    assert client.run_calls == [], "no container may start without a GPU"


def test_stack_rejects_invalid_router_spec(tmp_path):
    with pytest.raises(StackError, match="invalid router release 'sglang==1'"):
        DockerStack(router="sglang==1", run_dir=tmp_path, client=FakeClient({}))


def test_stack_gated_model_error_and_cleanup(isolated_home, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    client = FakeClient({"server-grpc": (GATED_LOG, 1)})
    run_dir = isolated_home / "run"
    with pytest.raises(StackError) as raised:
        with DockerStack(router="installed", run_dir=run_dir, client=client):
            pass
    first_line, _, rest = str(raised.value).partition("\n")
    assert first_line.startswith("the Hugging Face hub refused to download google/gemma-3-270m-it")
    assert first_line.endswith("set HF_TOKEN to a token whose account accepted the model's license")
    assert "GatedRepoError" in rest
    assert client.container.removed, "stop() must remove the container after a failed start"
    chown = [call for call in client.container.exec_calls if call[0] == "chown"]
    assert chown == [["chown", "-R", f"{os.getuid()}:{os.getgid()}", CONTAINER_LOG_DIR]]


def test_stack_server_exit_attaches_log_tail(isolated_home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    crash = f"token in env {TOKEN}\nRuntimeError: CUDA error: no kernel image is available\n"
    client = FakeClient({"server-grpc": (crash, 1)})
    run_dir = isolated_home / "run"
    with pytest.raises(StackError) as raised:
        with DockerStack(router="installed", run_dir=run_dir, client=client):
            pass
    message = str(raised.value)
    assert re.fullmatch(r"sglang gRPC server exited with code 1 while waiting for grpc://127\.0\.0\.1:\d+",
                        message.splitlines()[0])
    assert "no kernel image is available" in message
    assert TOKEN not in message
    # The log file that the report uploads is masked once the stack stops.
    assert TOKEN not in (run_dir / "logs" / "server-grpc.log").read_text()
    assert client.container.removed


def test_stack_starts_container_and_servers_as_report(isolated_home, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    client = FakeClient({"server-grpc": ("boom\n", 1)})
    run_dir = isolated_home / "run"
    with pytest.raises(StackError):
        with DockerStack(router="installed", run_dir=run_dir, client=client):
            pass

    (spec,) = client.run_calls
    assert spec["image"] == "lmsysorg/sglang:v0.5.7-runtime"
    assert spec["volumes"][str(isolated_home / "home" / ".cache" / "huggingface")]["bind"] == CONTAINER_HF_CACHE
    assert spec["environment"]["HF_TOKEN"] == TOKEN
    assert spec["labels"][RUN_ID_LABEL] == spec["environment"]["HARNESS_RUN_ID"]
    assert owner_alive(spec["labels"][OWNER_LABEL])

    commands = {client.api.names[exec_id]: shlex.split(cmd[2])[1:-3] for exec_id, cmd in client.api.commands.items()}
    assert sorted(commands) == ["server-grpc", "server-http"]
    grpc_port = int(commands["server-grpc"][-1])
    http_port = int(commands["server-http"][-1])
    assert grpc_port != http_port
    assert commands["server-grpc"] == server_command("google/gemma-3-270m-it", grpc_port, grpc=True, host="127.0.0.1")
    assert commands["server-http"] == server_command("google/gemma-3-270m-it", http_port, grpc=False, host="127.0.0.1")


def test_stack_repr_and_info_hide_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    stack = DockerStack(router="smg==1.13.0", run_dir=tmp_path, client=FakeClient({}))
    assert TOKEN not in repr(stack)
    assert TOKEN not in repr(stack.info)
    assert stack.info.router == "smg==1.13.0"
    assert stack.info.versions["image"] == "lmsysorg/sglang:v0.5.7-runtime"


def test_stack_stop_twice_and_unstarted(tmp_path):
    stack = DockerStack(router="installed", run_dir=tmp_path, client=FakeClient({}))
    stack.stop()
    stack.stop()
    with pytest.raises(StackError, match="not started"):
        stack.endpoints


# -- live ----------------------------------------------------------------------------------------

_LIVE_SKIP_REASON = probe_docker_gpu()


@pytest.mark.slow
@pytest.mark.skipif(_LIVE_SKIP_REASON is not None, reason=f"Docker stack cannot run here: {_LIVE_SKIP_REASON}")
def test_live_stack_serves_both_modes(tmp_path):
    import docker

    client = docker.from_env()
    body = {
        "model": "google/gemma-3-270m-it",
        "messages": [{"role": "user", "content": "Why sky is blue?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with DockerStack(router="installed", run_dir=tmp_path) as stack:
        mark = stack.wire_mark()
        for url in (stack.endpoints.grpc_router, stack.endpoints.http_router):
            response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
        records = stack.wire_records_since(mark)
        assert len(records) == 1, "only the gRPC-mode router's call crosses the tap"
        assert records[0].request.prompt_ids
        stack.check_alive()
        assert "sglang" in stack.info.versions
    assert client.containers.list(all=True, filters={"label": f"{RUN_ID_LABEL}={current_run_id()}"}) == []
