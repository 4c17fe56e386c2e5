"""The CPU stack: the real router wheel in front of the harness's CPU engine.

Components, each a process in its own process group on free loopback ports:

- ``engine``: ``python -m harness engine`` on the model folder, with a gRPC listener (the
  sglang scheduler contract) and an HTTP listener (sglang's HTTP API);
- ``tap``: ``python -m harness tap`` between the gRPC-mode router and the engine, recording
  every Generate call to ``wire.jsonl``;
- ``router-grpc``: the router release in gRPC mode, its worker being the tap;
- ``router-http``: the same release in HTTP mode, its worker being the engine's HTTP listener.

Start-up order follows the dependencies, and each step waits with its own strategy until
the component answers; a failure anywhere stops whatever already started.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from harness.capture import WireRecord
from harness.stacks.base import Endpoints, Stack, StackError, StackInfo
from harness.stacks.process import ManagedProcess, free_port, reap_leftovers
from harness.stacks.routers import RouterRelease
from harness.stacks.waiting import ChatSucceeds, GrpcHealthy, HttpOk, PortOpen
from harness.tap import read_records

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SERVED_MODEL_NAME = "google/gemma-3-270m-it"

# Loading float32 Gemma 3 270M takes a few seconds; a cold page cache on a busy 2-core
# machine has been seen to take much longer, so the bound is generous.
ENGINE_START_TIMEOUT_S = 300.0
ROUTER_START_TIMEOUT_S = 180.0
# How long a finished chat request may take to show up in the tap's record file: the router
# can answer its client before the tap has written the call's line.
WIRE_SETTLE_TIMEOUT_S = 5.0


class CpuStack(Stack):
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

        engine_grpc, engine_http, tap_port = free_port(), free_port(), free_port()
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
        HttpOk(f"http://{HOST}:{engine_http}/health", component="engine").wait(engine, ENGINE_START_TIMEOUT_S)
        GrpcHealthy(f"{HOST}:{engine_grpc}", component="engine gRPC listener").wait(engine, ENGINE_START_TIMEOUT_S)
        log.info("engine ready after %.1f s (gRPC %d, HTTP %d)", time.monotonic() - started, engine_grpc, engine_http)

        tap = self._spawn(
            "tap",
            [
                sys.executable, "-m", "harness", "tap",
                "--listen", f"{HOST}:{tap_port}",
                "--upstream", f"{HOST}:{engine_grpc}",
                "--record", str(self.wire_path),
            ],
        )
        PortOpen(HOST, tap_port, component="tap").wait(tap, 30.0)

        grpc_router_url = self._start_router("grpc", f"grpc://{HOST}:{tap_port}")
        http_router_url = self._start_router("http", f"http://{HOST}:{engine_http}")

        self._endpoints = Endpoints(
            http_router=http_router_url,
            grpc_router=grpc_router_url,
            server_http=f"http://{HOST}:{engine_http}",
            server_grpc=f"{HOST}:{engine_grpc}",
            tap=f"{HOST}:{tap_port}",
        )
        log.info("cpu stack ready after %.1f s with %s", time.monotonic() - started, self.release.spec)

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
            router, ROUTER_START_TIMEOUT_S
        )
        return url

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        process = ManagedProcess(name, argv, env=env, log_path=self.logs_dir / f"{name}.log")
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
    def endpoints(self) -> Endpoints:
        if self._endpoints is None:
            raise StackError("the cpu stack is not started")
        return self._endpoints

    @property
    def info(self) -> StackInfo:
        return StackInfo(
            name=self.name,
            router=self.release.spec,
            model_dir=str(self.model_dir),
            served_model_name=self.served_model_name,
            versions={"router": self.release.spec},
        )

    def wire_mark(self) -> int:
        return len(self._generate_records())

    def wire_records_since(self, mark: int) -> list[WireRecord]:
        deadline = time.monotonic() + WIRE_SETTLE_TIMEOUT_S
        records = self._generate_records()[mark:]
        while not records and time.monotonic() < deadline:
            time.sleep(0.05)
            records = self._generate_records()[mark:]
        return records

    def _generate_records(self) -> list[WireRecord]:
        if not self.wire_path.exists():
            return []
        return [record for record in read_records(self.wire_path) if record.request.prompt_ids]

    def log_paths(self) -> dict[str, Path]:
        return {process.name: process.log_path for process in self._processes}

    def check_alive(self) -> None:
        for process in self._processes:
            if not process.alive():
                raise StackError(
                    f"{process.name} exited with code {process.returncode}; last lines of {process.log_path}:\n"
                    f"{process.log_tail()}"
                )
