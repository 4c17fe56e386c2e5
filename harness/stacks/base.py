"""The interface every stack offers: start, endpoints per mode, logs, wire records, stop.

A stack is the set of processes (or containers) that serve one model twice. A router in
gRPC mode sits in front of the server's gRPC listener, with the tap on that wire, and a
router in HTTP mode sits in front of the server's HTTP listener. The replay only talks to a stack
through this interface, so the CPU stack and the Docker stack are interchangeable.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.lifecycle import StartStop

if TYPE_CHECKING:
    from harness.capture import WireRecord


class StackError(RuntimeError):
    """A stack could not start or stopped working; the message names the component."""


@dataclass
class Endpoints:
    """Base URLs of the stack once it is up."""

    # The router in HTTP mode, e.g. "http://127.0.0.1:31001".
    http_router: str
    # The router in gRPC mode (its HTTP front; it talks gRPC to the worker).
    grpc_router: str
    # The server's own HTTP API (for the ``direct`` mode), or None when it has none.
    server_http: str | None = None
    # The server's gRPC listener, as "host:port", and the tap in front of it.
    server_grpc: str | None = None
    tap: str | None = None


@dataclass
class StackInfo:
    """Facts about the stack a run used, as the report shows them."""

    name: str
    router: str
    model_dir: str
    served_model_name: str
    versions: dict[str, str] = field(default_factory=dict)


class Stack(StartStop, abc.ABC):
    """A started-on-enter, stopped-on-exit set of servers; cleans up when start fails."""

    name: str = "stack"

    @abc.abstractmethod
    def start(self) -> None:
        """Start every component and wait until a chat request succeeds in both modes."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop every component this stack started; safe to call twice or after a failed start."""

    # Set by ``start`` once every component is ready.
    _endpoints: Endpoints | None = None

    @property
    def endpoints(self) -> Endpoints:
        """Return the endpoints; raise StackError before ``start`` has returned."""
        if self._endpoints is None:
            raise StackError(f"the {self.name} stack is not started")
        return self._endpoints

    @property
    @abc.abstractmethod
    def info(self) -> StackInfo:
        """Return the facts the report shows about this stack."""

    @abc.abstractmethod
    def wire_mark(self) -> int:
        """Return the number of Generate calls the tap has recorded so far."""

    @abc.abstractmethod
    def wire_records_since(self, mark: int) -> list["WireRecord"]:
        """Return the calls the tap recorded after ``mark``, waiting briefly for ones in flight."""

    @abc.abstractmethod
    def log_paths(self) -> dict[str, Path]:
        """Return each component's log file, by component name."""

    @abc.abstractmethod
    def check_alive(self) -> None:
        """Raise StackError naming the component that exited, with its log tail."""


# How long a finished chat request may take to show up in the tap's record file, because the
# router can respond to its client before the tap has written the call's line.
WIRE_SETTLE_TIMEOUT_S = 5.0


class TapRecordFile:
    """The wire methods of a stack whose tap appends Generate calls to ``self.wire_path``."""

    wire_path: Path

    def wire_mark(self) -> int:
        return len(self._generate_records())

    def wire_records_since(self, mark: int) -> list["WireRecord"]:
        deadline = time.monotonic() + WIRE_SETTLE_TIMEOUT_S
        records = self._generate_records()[mark:]
        while not records and time.monotonic() < deadline:
            time.sleep(0.05)
            records = self._generate_records()[mark:]
        return records

    def _generate_records(self) -> list["WireRecord"]:
        from harness.tap import read_records

        if not self.wire_path.exists():
            return []
        return [record for record in read_records(self.wire_path) if record.request.prompt_ids]
