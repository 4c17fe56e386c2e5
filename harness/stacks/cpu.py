"""The CPU stack: the real router wheel in front of the harness's CPU engine.

Components, each a process in its own process group on free loopback ports:

- ``engine``: ``python -m harness engine`` on the model folder, with a gRPC listener (the
  sglang scheduler contract) and an HTTP listener (sglang's HTTP API);
- ``tap``: ``python -m harness tap`` between the gRPC-mode router and the engine, recording
  every Generate call to ``wire.jsonl``;
- ``router-grpc``: the router release in gRPC mode, its worker being the tap;
- ``router-http``: the same release in HTTP mode, its worker being the engine's HTTP listener.

Start-up order follows the dependencies, and each step waits with its own strategy until
the component is ready. A failure anywhere stops whatever already started.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from harness.stacks.base import Endpoints, Stack, StackError, StackInfo, TapRecordFile
from harness.stacks.process import ManagedProcess, free_port, reap_leftovers
from harness.stacks.routers import RouterRelease
from harness.stacks.waiting import ChatSucceeds, GrpcHealthy, HttpOk, PortOpen, ProcessExited

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SERVED_MODEL_NAME = "google/gemma-3-270m-it"

# Loading float32 Gemma 3 270M takes a few seconds. A cold page cache on a busy 2-core
# machine has been seen to take much longer, so the bound is generous.
ENGINE_START_TIMEOUT_S = 300.0
ROUTER_START_TIMEOUT_S = 180.0
TAP_START_TIMEOUT_S = 30.0
# Overrides every start-up bound above, in seconds (e.g. a short bound for a quick failure in CI).
START_TIMEOUT_ENV = "HARNESS_START_TIMEOUT_S"

# free_port can hand out a port that another process takes before the component binds it.
# A component that exits with one of these lines in its log is started again on new ports.
BIND_FAILURE = re.compile(r"cannot bind|address already in use|address in use", re.IGNORECASE)
START_ATTEMPTS = 3

# The CPU stack reads its model from a local folder, so its components get no hub token.
HUB_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")


def start_timeout(default_s: float) -> float:
    """Return ``default_s``, or the bound set in HARNESS_START_TIMEOUT_S; raise StackError if invalid."""
    text = os.environ.get(START_TIMEOUT_ENV)
    if not text:
        return default_s
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise StackError(f"{START_TIMEOUT_ENV}={text!r} is not a positive number of seconds")
    return value


def component_role(process_name: str) -> str:
    """Return "router", "engine" or "tap" for a component name such as "router-grpc"."""
    return process_name.split("-", 1)[0]


class CpuStack(TapRecordFile, Stack):
    name = "cpu"

    def __init__(self, model_dir: Path, router: str, run_dir: Path, served_model_name: str = SERVED_MODEL_NAME):
        self.model_dir = Path(model_dir)
        self.release = RouterRelease.parse(router)
        self.run_dir = Path(run_dir)
        self.served_model_name = served_model_name
        self.wire_path = self.run_dir / "wire.jsonl"
        self.logs_dir = self.run_dir / "logs"
        self._processes: list[ManagedProcess] = []
        self._endpoints: Endpoints | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        reaped = reap_leftovers()
        if reaped:
            log.info("removed %d process groups left by earlier runs", len(reaped))
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()

        self.release.ensure()

        engine_grpc, engine_http = self._with_port_retry("engine", self._start_engine)
        log.info("engine ready after %.1f s (gRPC %d, HTTP %d)", time.monotonic() - started, engine_grpc, engine_http)
        tap_port = self._with_port_retry("tap", lambda: self._start_tap(engine_grpc))
        grpc_router_url = self._with_port_retry(
            "router-grpc", lambda: self._start_router("grpc", f"grpc://{HOST}:{tap_port}"))
        http_router_url = self._with_port_retry(
            "router-http", lambda: self._start_router("http", f"http://{HOST}:{engine_http}"))

        self._endpoints = Endpoints(
            http_router=http_router_url,
            grpc_router=grpc_router_url,
            server_http=f"http://{HOST}:{engine_http}",
            server_grpc=f"{HOST}:{engine_grpc}",
            tap=f"{HOST}:{tap_port}",
        )
        log.info("cpu stack ready after %.1f s with %s", time.monotonic() - started, self.release.spec)

    def _with_port_retry(self, name: str, start: Callable):
        """Call ``start`` again on new ports while component ``name`` exits because its port was taken."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return start()
            except ProcessExited as error:
                if not BIND_FAILURE.search(error.log_tail) or attempt == START_ATTEMPTS:
                    if BIND_FAILURE.search(error.log_tail):
                        raise StackError(
                            f"{name} could not bind its port in {START_ATTEMPTS} attempts: another process "
                            f"took each free port first; last lines of its log:\n{error.log_tail.rstrip()}") from None
                    raise
                log.warning("%s exited because its port was taken (attempt %d of %d); retrying on new ports",
                            name, attempt, START_ATTEMPTS)
                self._forget(name)
        raise AssertionError("unreachable")

    def _forget(self, name: str) -> None:
        for process in [p for p in self._processes if p.name == name]:
            process.stop()
            self._processes.remove(process)

    def _start_engine(self) -> tuple[int, int]:
        engine_grpc, engine_http = free_port(), free_port()
        engine = self._spawn(
            "engine",
            [
                sys.executable, "-m", "harness", "engine",
                "--model-dir", str(self.model_dir),
                "--served-model-name", self.served_model_name,
                "--host", HOST,
                "--grpc-port", str(engine_grpc),
                "--http-port", str(engine_http),
            ],
        )
        timeout = start_timeout(ENGINE_START_TIMEOUT_S)
        HttpOk(f"http://{HOST}:{engine_http}/health", component="engine").wait(engine, timeout)
        GrpcHealthy(f"{HOST}:{engine_grpc}", component="engine gRPC listener").wait(engine, timeout)
        return engine_grpc, engine_http

    def _start_tap(self, engine_grpc: int) -> int:
        tap_port = free_port()
        tap = self._spawn(
            "tap",
            [
                sys.executable, "-m", "harness", "tap",
                "--listen", f"{HOST}:{tap_port}",
                "--upstream", f"{HOST}:{engine_grpc}",
                "--record", str(self.wire_path),
            ],
        )
        PortOpen(HOST, tap_port, component="tap").wait(tap, start_timeout(TAP_START_TIMEOUT_S))
        return tap_port

    def _start_router(self, mode: str, worker_url: str) -> str:
        port, prometheus_port = free_port(), free_port()
        command = self.release.command(
            mode=mode,
            worker_url=worker_url,
            host=HOST,
            port=port,
            prometheus_port=prometheus_port,
            model_path=str(self.model_dir),
            tokenizer_path=str(self.model_dir),
        )
        router = self._spawn(f"router-{mode}", command, env=self.release.env())
        url = f"http://{HOST}:{port}"
        ChatSucceeds(url, model=self.served_model_name, component=f"router in {mode} mode").wait(
            router, start_timeout(ROUTER_START_TIMEOUT_S)
        )
        return url

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        child_env: dict[str, str | None] = {variable: None for variable in HUB_TOKEN_VARIABLES}
        child_env.update(env or {})
        process = ManagedProcess(name, argv, env=child_env, log_path=self.logs_dir / f"{name}.log")
        self._processes.append(process)
        process.start()
        return process

    def stop(self) -> None:
        # Routers first, so nothing sends new work to the engine while it stops.
        for process in reversed(self._processes):
            try:
                process.stop()
            except OSError as error:
                log.warning("stopping %s failed: %s", process.name, error)

    # -- what the replay reads ---------------------------------------------------------------

    @property
    def info(self) -> StackInfo:
        return StackInfo(
            name=self.name,
            router=self.release.spec,
            model_dir=str(self.model_dir),
            served_model_name=self.served_model_name,
            versions={"router": self.release.spec},
        )

    def log_paths(self) -> dict[str, Path]:
        return {process.name: process.log_path for process in self._processes}

    def check_alive(self) -> None:
        """Raise StackError "ROLE died: NAME exited with code N" and the log tail for the first dead component.

        Components are checked in start order, so when the engine dies the error names the
        engine, not the routers whose requests then fail.
        """
        for process in self._processes:
            if not process.alive():
                raise StackError(
                    f"{component_role(process.name)} died: {process.name} (pid {process.pid}) exited with code "
                    f"{process.returncode}{_signal_note(process.returncode)}; last lines of {process.log_path}:\n"
                    f"{process.log_tail()}"
                )


def _signal_note(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return ""
    try:
        return f" (killed by {signal.Signals(-returncode).name})"
    except ValueError:
        return ""
