"""The Docker stack: sglang's runtime image on a GPU box, started the way the user report did.

The report ran::

    docker run -itd --gpus all --runtime=nvidia -p 30000:30000 \\
        -v ${HOME}/.cache/huggingface:/root/.cache/huggingface \\
        --name dev lmsysorg/sglang:v0.5.7-runtime bash

and then ``python3 -m sglang.launch_server ... --grpc-mode`` and the router inside it. This
stack starts one such container per run and execs into it:

- ``server-grpc``: ``sglang.launch_server`` with the report's flags and ``--grpc-mode``;
- ``server-http``: the same flags without ``--grpc-mode``, on another port;
- ``router-grpc`` / ``router-http``: the router (the image's own, or a release pip-installed
  into the container) with the tap or the HTTP server as its worker.

The tap runs on the host (``python -m harness tap``), because the replay reads its record
file. Each exec'd process writes its log into ``run_dir/logs``, which is mounted into the
container, so log tails and ``log_paths`` work as for the CPU stack.

Every container carries the run id and its owner process as labels, so ``reap_containers``
can remove containers that a killed run left behind. ``stop`` removes the container, which
also ends every process exec'd into it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from harness.stacks.base import Endpoints, Stack, StackError, StackInfo, TapRecordFile
from harness.stacks.process import ManagedProcess, current_run_id, free_port, reap_leftovers
from harness.stacks.routers import ROUTER_PACKAGES, WORKER_URL_SCHEMES, RouterPackage, RouterRelease
from harness.stacks.waiting import ChatSucceeds, GrpcHealthy, HttpOk, PortOpen, WaitStrategy

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "lmsysorg/sglang:v0.5.7-runtime"
DEFAULT_MODEL = "google/gemma-3-270m-it"
HOST = "127.0.0.1"

# Labels on every container this module starts. The owner label is "HOSTNAME PID START_TIME"
# (START_TIME is field 22 of /proc/PID/stat), so a reused pid does not look like a live owner.
RUN_ID_LABEL = "org.sglang-harness.run-id"
OWNER_LABEL = "org.sglang-harness.owner"

# Paths inside the container.
CONTAINER_HF_CACHE = "/root/.cache/huggingface"
CONTAINER_LOG_DIR = "/harness/logs"
CONTAINER_MODEL_DIR = "/harness/model"

# The first start on a box downloads the model into the HF cache. sglang 0.5.7 then captures
# CUDA graphs, and flashinfer may compile kernels on first use. The bound is generous so that
# a cold cache fits, and finite so that a hung server fails the job before the job's limit.
# NOTE: 30 minutes is an estimate; no start-up time was measured on a GPU box yet.
SERVER_START_TIMEOUT_S = 1800.0
# The router registers the worker and then loads the tokenizer, which the server already put
# into the HF cache. On the CPU stack that took a second or two, so 5 minutes is ample.
ROUTER_START_TIMEOUT_S = 300.0
# pip-installing a router release into the container downloads its wheel from PyPI.
ROUTER_INSTALL_TIMEOUT_S = 600.0
TAP_START_TIMEOUT_S = 30.0
# Timeout of each Docker API call; pulling and starting use their own bounds above.
DOCKER_API_TIMEOUT_S = 120

LOG_TAIL_LINES = 40

# Lines of a server log that mean the hub refused the model download (HTTP 401/403, gated
# repository). huggingface_hub raises GatedRepoError and prints "Access to model X is
# restricted" or "Cannot access gated repo"; an invalid token gives "401 Client Error".
_GATED_PATTERNS = (
    re.compile(r"GatedRepoError"),
    re.compile(r"Cannot access gated repo", re.IGNORECASE),
    re.compile(r"Access to model \S+ is restricted", re.IGNORECASE),
    re.compile(r"\b401 Client Error\b"),
    re.compile(r"\b403 Client Error\b"),
)


class SecretStr(str):
    """A string whose ``repr`` is masked, so dicts that carry it can be logged safely.

    ``str()`` and formatting return the real value, which is what the Docker SDK sends.
    """

    def __repr__(self) -> str:
        return "'***'"


def mask_secrets(text: str, secrets: Sequence[str | None]) -> str:
    """Replace every occurrence of each non-empty secret in ``text`` with ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(str(secret), "***")
    return text


# -- pure builders: what the container and its processes look like -----------------------------


def _process_start_time(pid: int) -> str | None:
    """Return field 22 of /proc/PID/stat (start time in clock ticks), or None if pid is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return stat.rsplit(")", 1)[1].split()[19]


def owner_label(pid: int | None = None) -> str:
    """Return the owner label value for ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()} {pid} {_process_start_time(pid)}"


def container_spec(
    image: str,
    run_id: str,
    owner: str,
    hf_cache_dir: Path,
    log_dir: Path,
    model_dir: Path | None = None,
    hf_token: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Build the ``client.containers.run`` keyword arguments for one run's container.

    The result mirrors the report's ``docker run -itd --gpus all --runtime=nvidia -v
    ${HOME}/.cache/huggingface:/root/.cache/huggingface IMAGE bash``, with two changes:

    - Host networking in place of ``-p 30000:30000``. The tap runs on the host and listens on
      127.0.0.1 only, and the gRPC-mode router inside the container must reach it. On the
      default bridge network, the container cannot reach the host's loopback, so the tap
      would have to listen on the bridge address. Host networking makes 127.0.0.1 the same
      address inside and outside, and every listener binds to 127.0.0.1 only.
    - The container name carries the run id in place of ``dev``, so two runs (or a person's
      own ``dev`` container) do not collide.

    The HF token, when given, is a ``SecretStr``, so ``repr`` of the result masks it.
    """
    from docker.types import DeviceRequest

    volumes: dict[str, dict[str, str]] = {
        str(hf_cache_dir): {"bind": CONTAINER_HF_CACHE, "mode": "rw"},
        str(log_dir): {"bind": CONTAINER_LOG_DIR, "mode": "rw"},
    }
    if model_dir is not None:
        volumes[str(model_dir)] = {"bind": CONTAINER_MODEL_DIR, "mode": "ro"}

    environment: dict[str, str] = {"HARNESS_RUN_ID": run_id}
    if hf_token:
        environment["HF_TOKEN"] = SecretStr(hf_token)

    return {
        "image": image,
        "command": "bash",
        "name": name or f"sglang-harness-{run_id}",
        "detach": True,
        "tty": True,
        "stdin_open": True,
        # --gpus all
        "device_requests": [DeviceRequest(count=-1, capabilities=[["gpu"]])],
        "runtime": "nvidia",
        "network_mode": "host",
        "volumes": volumes,
        "environment": environment,
        "labels": {RUN_ID_LABEL: run_id, OWNER_LABEL: owner},
    }


def server_command(
    model: str,
    port: int,
    grpc: bool,
    host: str = "0.0.0.0",
    served_model_name: str | None = None,
) -> list[str]:
    """Build the report's ``sglang.launch_server`` argv, with ``--grpc-mode`` when ``grpc``.

    The report bound 0.0.0.0 so that ``-p`` could publish the port; under host networking
    the stack passes ``host="127.0.0.1"`` instead. ``served_model_name`` is added only when
    the model is a mounted folder, so the routers still see the hub name.
    """
    argv = [
        "python3", "-m", "sglang.launch_server",
        "--model-path", model,
        "--tokenizer-path", model,
    ]
    if grpc:
        argv.append("--grpc-mode")
    argv += [
        "--attention-backend", "flashinfer",
        "--dtype", "bfloat16",
        "--context-length", "2048",
        "--mem-fraction-static", "0.1",
        "--max-total-tokens", "2048",
        "--max-prefill-tokens", "512",
        "--trust-remote-code",
        "--log-level", "info",
        "--host", host,
        "--port", str(port),
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv


def router_command(
    package: RouterPackage,
    mode: str,
    worker_url: str,
    model: str,
    host: str,
    port: int,
    prometheus_port: int,
) -> list[str]:
    """Build the argv of the router inside the container, with the report's ``cache_aware`` policy.

    Flag names come from ``package.flags`` (harness.stacks.routers), so a release that renames
    a flag changes in one place. The Prometheus listener binds to ``host`` too, because its
    default is all interfaces and two routers need distinct ports.
    """
    scheme = WORKER_URL_SCHEMES.get(mode)
    if scheme is None:
        raise ValueError(f"invalid router mode {mode!r}: expected one of {', '.join(WORKER_URL_SCHEMES)}")
    if not worker_url.startswith(scheme):
        raise ValueError(f"worker URL {worker_url!r} does not match {mode} mode: expected {scheme}HOST:PORT")
    flags = package.flags
    return [
        "python3", "-m", package.module,
        flags["worker_urls"], worker_url,
        flags["model_path"], model,
        flags["tokenizer_path"], model,
        flags["policy"], "cache_aware",
        flags["host"], host,
        flags["port"], str(port),
        flags["prometheus_host"], host,
        flags["prometheus_port"], str(prometheus_port),
        flags["log_level"], "info",
    ]


def router_install_command(release: RouterRelease) -> list[str] | None:
    """Return the pip argv that installs ``release`` in the container, or None for "installed".

    NOTE: sglang-router 0.3.2 downloads its Harmony vocabulary at start-up. The container
    gets no local copy (TIKTOKEN_ENCODINGS_BASE), so a GPU box without internet fails there.
    """
    if release.installed:
        return None
    assert release.package is not None and release.version is not None
    return ["python3", "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
            f"{release.package.name}=={release.version}"]


def logged_command(argv: Sequence[str], log_path: str) -> list[str]:
    """Wrap ``argv`` so its output is appended to ``log_path``; ``exec`` keeps its exit code."""
    return ["bash", "-c", f"exec {shlex.join(argv)} >> {shlex.quote(log_path)} 2>&1"]


# Printed by the probe below: the first router package whose module the container's Python imports.
_ROUTER_PROBE = (
    "import importlib.util, importlib.metadata as m\n"
    "for name, module in {packages!r}:\n"
    "    if importlib.util.find_spec(module.split('.')[0]):\n"
    "        print(name, m.version(name)); break\n"
)


def router_probe_command() -> list[str]:
    """Return the argv that prints "PACKAGE VERSION" of the router the container's Python imports."""
    packages = [(package.name, package.module) for package in ROUTER_PACKAGES.values()]
    return ["python3", "-c", _ROUTER_PROBE.format(packages=packages)]


# -- checks before starting -------------------------------------------------------------------------


def connect(client: Any = None) -> Any:
    """Return a Docker client whose ping succeeded; raise StackError when no engine responds."""
    try:
        if client is None:
            import docker

            client = docker.from_env(timeout=DOCKER_API_TIMEOUT_S)
        client.ping()
    except Exception as error:  # noqa: BLE001 - the SDK raises DockerException, requests and OS errors
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise StackError(
            f"no Docker engine reachable: {first_line}; start dockerd or set DOCKER_HOST, "
            f"or use --stack cpu") from None
    return client


def check_gpu(engine_info: Mapping[str, Any], nvidia_smi: str | None) -> None:
    """Raise StackError unless the engine has the nvidia runtime and the host has nvidia-smi."""
    runtimes = sorted((engine_info.get("Runtimes") or {}).keys())
    if "nvidia" not in runtimes:
        raise StackError(
            f"no GPU: the Docker engine has no nvidia runtime (runtimes: {', '.join(runtimes) or 'none'}); "
            f"install the NVIDIA Container Toolkit, or use --stack cpu")
    if nvidia_smi is None:
        raise StackError("no GPU: nvidia-smi is not on PATH, so no NVIDIA driver is installed; use --stack cpu")


def gated_model_message(log_tail: str, model: str, hf_token_set: bool) -> str | None:
    """Return a one-line error when the server log shows the hub refused ``model``, else None."""
    if not any(pattern.search(log_tail) for pattern in _GATED_PATTERNS):
        return None
    if hf_token_set:
        return (f"the Hugging Face hub refused to download {model} with the HF_TOKEN given: "
                f"check that the token is valid and that its account accepted the model's license")
    return (f"the Hugging Face hub refused to download {model}: it is gated; "
            f"set HF_TOKEN to a token whose account accepted the model's license")


def probe_docker_gpu() -> str | None:
    """Return why the Docker stack cannot run here (no engine, no GPU), or None when it can."""
    try:
        client = connect()
        check_gpu(client.info(), shutil.which("nvidia-smi"))
    except StackError as error:
        return str(error)
    return None


# -- the reaper ---------------------------------------------------------------------------------


def owner_alive(owner: str, hostname: str | None = None) -> bool:
    """Return whether the process named by an owner label still runs.

    An owner on another host cannot be checked from here and counts as alive, so a Docker
    engine shared by several machines never loses another machine's containers.
    """
    hostname = socket.gethostname() if hostname is None else hostname
    try:
        owner_host, pid_text, start_time = owner.split()
        pid = int(pid_text)
    except ValueError:
        # A malformed label cannot name a live process of this module.
        return False
    if owner_host != hostname:
        return True
    return _process_start_time(pid) == start_time


def reap_containers(
    client: Any,
    current_run: str | None = None,
    is_owner_alive: Callable[[str], bool] = owner_alive,
) -> list[str]:
    """Remove containers of earlier runs whose owner process is gone; return their names.

    Only containers labelled with ``RUN_ID_LABEL`` are looked at, and the current run's are
    kept whatever their owner label contains.
    """
    removed: list[str] = []
    for container in client.containers.list(all=True, filters={"label": RUN_ID_LABEL}):
        labels = container.labels or {}
        run_id = labels.get(RUN_ID_LABEL)
        if run_id == current_run:
            continue
        if is_owner_alive(labels.get(OWNER_LABEL, "")):
            continue
        log.warning("removing container %s left by run %s (owner %s)", container.name, run_id,
                    labels.get(OWNER_LABEL, "unknown"))
        try:
            container.remove(force=True)
        except Exception as error:  # noqa: BLE001 - docker.errors.APIError/NotFound; another reaper may race
            log.warning("removing container %s failed: %s", container.name, error)
            continue
        removed.append(container.name)
    return removed


# -- processes exec'd into the container ---------------------------------------------------------


class ContainerProcess:
    """A process exec'd into the container in the background, logging to a mounted file.

    It has the methods the wait strategies call on a ManagedProcess (``alive``,
    ``returncode``, ``log_tail``, ``log_path``, ``name``).
    """

    def __init__(self, api: Any, container_id: str, name: str, argv: Sequence[str], log_path: Path,
                 container_log_path: str, secrets: Sequence[str | None] = ()) -> None:
        self.api = api
        self.container_id = container_id
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.container_log_path = container_log_path
        self.secrets = list(secrets)
        self.exec_id: str | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log_file:
            log_file.write(f"--- {time.strftime('%H:%M:%S')} starting {self.name}: {shlex.join(self.argv)}\n")
        command = logged_command(self.argv, self.container_log_path)
        try:
            self.exec_id = self.api.exec_create(self.container_id, command)["Id"]
            self.api.exec_start(self.exec_id, detach=True)
        except Exception as error:  # noqa: BLE001 - docker.errors.APIError, or the engine went away
            raise StackError(f"starting {self.name} in container {self.container_id[:12]} failed: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
        log.info("started %s in container %s, log: %s", self.name, self.container_id[:12], self.log_path)

    def _inspect(self) -> dict[str, Any]:
        if self.exec_id is None:
            return {"Running": False, "ExitCode": None}
        return self.api.exec_inspect(self.exec_id)

    def alive(self) -> bool:
        return bool(self._inspect().get("Running"))

    @property
    def returncode(self) -> int | None:
        state = self._inspect()
        return None if state.get("Running") else state.get("ExitCode")

    def wait_exit(self, timeout: float) -> int:
        """Block until the process exits and return its exit code; raise StackError on timeout."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                raise StackError(f"{self.name} did not finish within {timeout:.0f} s; last lines of {self.log_path}:\n"
                                 f"{self.log_tail()}")
            time.sleep(1.0)
        code = self.returncode
        return -1 if code is None else int(code)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the log, with secrets masked."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return mask_secrets("".join(text.splitlines(keepends=True)[-lines:]), self.secrets)


# -- the stack ------------------------------------------------------------------------------------


class DockerStack(TapRecordFile, Stack):
    name = "docker"

    def __init__(
        self,
        router: str,
        run_dir: Path,
        model_dir: Path | None = None,
        model: str = DEFAULT_MODEL,
        image: str = DEFAULT_IMAGE,
        client: Any = None,
    ) -> None:
        try:
            self.release = RouterRelease.parse(router)
        except ValueError as error:
            raise StackError(str(error)) from None
        self.run_dir = Path(run_dir)
        self.model_dir = Path(model_dir).resolve() if model_dir is not None else None
        self.served_model_name = model
        self.image = image
        self.wire_path = self.run_dir / "wire.jsonl"
        self.logs_dir = self.run_dir / "logs"
        self.hf_token = os.environ.get("HF_TOKEN") or None
        self._client = client
        self._container: Any = None
        self._processes: list[ContainerProcess] = []
        self._tap: ManagedProcess | None = None
        self._endpoints: Endpoints | None = None
        self._versions: dict[str, str] = {"image": image}

    def __repr__(self) -> str:
        return f"DockerStack(router={self.release.spec!r}, image={self.image!r}, model={self.model_path!r})"

    @property
    def model_path(self) -> str:
        """Return the model path passed to the servers: the mounted folder, or the hub name."""
        return CONTAINER_MODEL_DIR if self.model_dir is not None else self.served_model_name

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        client = connect(self._client)
        self._client = client
        check_gpu(client.info(), shutil.which("nvidia-smi"))

        run_id = current_run_id()
        removed = reap_containers(client, current_run=run_id)
        if removed:
            log.info("removed %d containers left by earlier runs", len(removed))
        reap_leftovers()

        self._ensure_image(client)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        hf_cache = Path.home() / ".cache" / "huggingface"
        # Created here so that Docker does not create it as root.
        hf_cache.mkdir(parents=True, exist_ok=True)
        spec = container_spec(
            self.image, run_id, owner_label(), hf_cache, self.logs_dir,
            model_dir=self.model_dir, hf_token=self.hf_token,
        )
        log.info("starting container %s from %s", spec["name"], self.image)
        try:
            self._container = client.containers.run(**spec)
        except Exception as error:  # noqa: BLE001 - docker.errors.APIError/ImageNotFound
            raise StackError(f"starting container {spec['name']} from {self.image} failed: "
                             f"{self._mask(str(error)).splitlines()[0]}") from None

        package = self._prepare_router()

        grpc_port, http_port, tap_port = free_port(), free_port(), free_port()
        served_name = self.served_model_name if self.model_dir is not None else None
        server_grpc = self._exec("server-grpc", server_command(self.model_path, grpc_port, grpc=True, host=HOST,
                                                               served_model_name=served_name))
        server_http = self._exec("server-http", server_command(self.model_path, http_port, grpc=False, host=HOST,
                                                               served_model_name=served_name))
        # Both servers load at once; the second wait mostly finds its server ready.
        self._wait_server(GrpcHealthy(f"{HOST}:{grpc_port}", component="sglang gRPC server"), server_grpc)
        self._wait_server(HttpOk(f"http://{HOST}:{http_port}/health", component="sglang HTTP server"), server_http)
        log.info("servers ready after %.1f s (gRPC %d, HTTP %d)", time.monotonic() - started, grpc_port, http_port)

        self._tap = ManagedProcess(
            "tap",
            [sys.executable, "-m", "harness", "tap",
             "--listen", f"{HOST}:{tap_port}",
             "--upstream", f"{HOST}:{grpc_port}",
             "--record", str(self.wire_path)],
            env=None,
            log_path=self.logs_dir / "tap.log",
        )
        self._tap.start()
        PortOpen(HOST, tap_port, component="tap").wait(self._tap, TAP_START_TIMEOUT_S)

        grpc_router_url = self._start_router(package, "grpc", f"grpc://{HOST}:{tap_port}")
        http_router_url = self._start_router(package, "http", f"http://{HOST}:{http_port}")
        self._endpoints = Endpoints(
            http_router=http_router_url,
            grpc_router=grpc_router_url,
            server_http=f"http://{HOST}:{http_port}",
            server_grpc=f"{HOST}:{grpc_port}",
            tap=f"{HOST}:{tap_port}",
        )
        self._versions.update(self._probe_versions())
        log.info("docker stack ready after %.1f s with %s", time.monotonic() - started, self._versions)

    def _ensure_image(self, client: Any) -> None:
        import docker.errors

        try:
            image = client.images.get(self.image)
        except docker.errors.ImageNotFound:
            log.info("pulling %s (several GB; this can take minutes)", self.image)
            try:
                # The SDK splits "REPOSITORY:TAG" itself when no tag argument is given.
                image = client.images.pull(self.image)
            except docker.errors.APIError as error:
                raise StackError(f"pulling image {self.image} failed: {str(error).splitlines()[0]}") from None
        self._versions["image_id"] = image.id

    def _prepare_router(self) -> RouterPackage:
        """Install the requested release into the container if needed; return its package."""
        install = router_install_command(self.release)
        if install is not None:
            installer = self._exec("router-install", install)
            code = installer.wait_exit(ROUTER_INSTALL_TIMEOUT_S)
            if code != 0:
                tail = installer.log_tail()
                if "No matching distribution found" in tail or "Could not find a version" in tail:
                    raise StackError(f"router release {self.release.spec} not found on the package index")
                raise StackError(f"installing router release {self.release.spec} in the container failed "
                                 f"with exit code {code}; last lines of {installer.log_path}:\n{tail}")
            assert self.release.package is not None
            return self.release.package

        output = self._run_probe(router_probe_command())
        fields = output.split()
        if len(fields) != 2 or fields[0] not in ROUTER_PACKAGES:
            raise StackError(
                f"no router package is importable in {self.image}: pass a release such as "
                f"--router smg==1.13.0 (probe printed {output.strip()!r})")
        self._versions["router"] = f"{fields[0]}=={fields[1]}"
        return ROUTER_PACKAGES[fields[0]]

    def _start_router(self, package: RouterPackage, mode: str, worker_url: str) -> str:
        port, prometheus_port = free_port(), free_port()
        command = router_command(package, mode, worker_url, self.model_path, HOST, port, prometheus_port)
        router = self._exec(f"router-{mode}", command)
        url = f"http://{HOST}:{port}"
        strategy = ChatSucceeds(url, model=self.served_model_name, component=f"router in {mode} mode")
        self._wait(strategy, router, ROUTER_START_TIMEOUT_S)
        return url

    def _wait_server(self, strategy: WaitStrategy, server: ContainerProcess) -> None:
        try:
            self._wait(strategy, server, SERVER_START_TIMEOUT_S)
        except StackError as error:
            gated = gated_model_message(server.log_tail(200), self.model_path, self.hf_token is not None)
            if gated is not None:
                raise StackError(f"{gated}\n--- last lines of {server.log_path} ---\n{server.log_tail()}") from error
            raise

    def _wait(self, strategy: WaitStrategy, process: ContainerProcess, timeout: float) -> None:
        try:
            strategy.wait(process, timeout)  # type: ignore[arg-type] - duck-typed ManagedProcess
        except StackError as error:
            if self.hf_token and self.hf_token in str(error):
                raise StackError(self._mask(str(error))) from None
            raise

    def _exec(self, name: str, argv: list[str]) -> ContainerProcess:
        assert self._container is not None
        process = ContainerProcess(
            self._client.api, self._container.id, name, argv,
            log_path=self.logs_dir / f"{name}.log",
            container_log_path=f"{CONTAINER_LOG_DIR}/{name}.log",
            secrets=[self.hf_token],
        )
        self._processes.append(process)
        process.start()
        return process

    def _run_probe(self, argv: list[str]) -> str:
        """Run a short command in the container and return its output; raise StackError on failure."""
        assert self._container is not None
        result = self._container.exec_run(argv)
        output = result.output.decode("utf-8", errors="replace") if result.output else ""
        if result.exit_code != 0:
            raise StackError(f"'{shlex.join(argv)[:80]}' failed in the container with exit code "
                             f"{result.exit_code}: {self._mask(output.strip())[-500:]}")
        return output

    def _probe_versions(self) -> dict[str, str]:
        versions: dict[str, str] = {}
        try:
            versions["sglang"] = self._run_probe(["python3", "-c", "import sglang; print(sglang.__version__)"]).strip()
            router = self._run_probe(router_probe_command()).split()
        except StackError as error:
            log.warning("reading versions in the container failed: %s", error)
            return versions
        if len(router) == 2:
            versions["router"] = f"{router[0]}=={router[1]}"
        return versions

    def _mask(self, text: str) -> str:
        return mask_secrets(text, [self.hf_token])

    def stop(self) -> None:
        if self._tap is not None:
            try:
                self._tap.stop()
            except OSError as error:
                log.warning("stopping the tap failed: %s", error)
        if self._container is not None:
            container, self._container = self._container, None
            try:
                # The exec'd processes run as root, so their log files in the mounted folder
                # belong to root. Hand them to this user before the container goes.
                container.exec_run(["chown", "-R", f"{os.getuid()}:{os.getgid()}", CONTAINER_LOG_DIR])
            except Exception as error:  # noqa: BLE001 - the container may already be gone
                log.warning("handing the container logs to uid %d failed: %s", os.getuid(), error)
            try:
                container.remove(force=True)
                log.info("removed container %s", container.name)
            except Exception as error:  # noqa: BLE001 - docker.errors.APIError/NotFound
                log.warning("removing container %s failed: %s", container.name, error)
        self._mask_log_files()

    def _mask_log_files(self) -> None:
        """Rewrite each log file with the HF token masked, because reports upload the logs."""
        if not self.hf_token:
            return
        for process in self._processes:
            try:
                text = process.log_path.read_text(errors="replace")
            except OSError:
                continue
            if self.hf_token in text:
                process.log_path.write_text(self._mask(text))

    # -- what the replay reads ---------------------------------------------------------------

    @property
    def info(self) -> StackInfo:
        return StackInfo(
            name=self.name,
            router=self.release.spec,
            model_dir=self.model_path,
            served_model_name=self.served_model_name,
            versions=dict(self._versions),
        )

    def log_paths(self) -> dict[str, Path]:
        paths = {process.name: process.log_path for process in self._processes}
        if self._tap is not None:
            paths["tap"] = self._tap.log_path
        return paths

    def check_alive(self) -> None:
        components: list[Any] = [p for p in self._processes if p.name != "router-install"]
        if self._tap is not None:
            components.append(self._tap)
        for process in components:
            if not process.alive():
                raise StackError(
                    f"{process.name} exited with code {process.returncode}; last lines of {process.log_path}:\n"
                    f"{self._mask(process.log_tail())}"
                )
