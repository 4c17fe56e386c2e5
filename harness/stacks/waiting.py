"""Wait strategies: objects that block until a component is ready, or fail with its log tail.

Each strategy makes one readiness check at a time (``check``) and ``wait`` repeats it until
it passes or the timeout ends. While waiting, the watched process is polled: a process that
exits fails the wait at once with its exit code and log tail, instead of after the timeout.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from harness.stacks.base import StackError

if TYPE_CHECKING:
    from harness.stacks.process import ManagedProcess

LOG_TAIL_LINES = 40


class WaitTimeout(StackError):
    """A component did not become ready in time; the first line names it, the URL and the wait."""

    def __init__(self, component: str, target: str, waited_s: float, last_error: str, log_tail: str = "",
                 log_path: Path | None = None) -> None:
        self.component = component
        self.target = target
        self.waited_s = waited_s
        self.last_error = last_error
        self.log_tail = log_tail
        message = f"{component} not ready at {target} after {waited_s:.1f} s (last check: {last_error})"
        super().__init__(message + _format_tail(log_tail, log_path))


class ProcessExited(StackError):
    """The process a wait watched exited before the component became ready."""

    def __init__(self, component: str, target: str, returncode: int | None, log_tail: str = "",
                 log_path: Path | None = None) -> None:
        self.component = component
        self.target = target
        self.returncode = returncode
        self.log_tail = log_tail
        message = f"{component} exited with code {returncode} while waiting for {target}"
        super().__init__(message + _format_tail(log_tail, log_path))


class NotReadyError(Exception):
    """Raised by ``check`` for a response that waiting cannot fix (e.g. HTTP 400)."""


def _format_tail(log_tail: str, log_path: Path | None) -> str:
    if not log_tail:
        return ""
    where = f" ({log_path})" if log_path else ""
    return f"\n--- last lines of the log{where} ---\n{log_tail.rstrip()}"


class WaitStrategy:
    """A readiness check repeated until it passes; subclasses implement ``check``."""

    # What the messages call the target, e.g. "http://127.0.0.1:30000/health".
    target: str = ""
    poll_interval_s: float = 0.2

    def __init__(self, component: str | None = None) -> None:
        self.component = component

    def check(self) -> str | None:
        """Make one readiness check: return None when ready, else why not.

        Raise NotReadyError when the response shows that waiting longer cannot help.
        """
        raise NotImplementedError

    def wait(self, process: "ManagedProcess | None", timeout: float) -> None:
        """Block until ``check`` passes; raise ProcessExited, WaitTimeout or StackError."""
        component = self.component or (process.name if process is not None else type(self).__name__)
        log_path = process.log_path if process is not None else None
        started = time.monotonic()
        deadline = started + timeout
        last_error = "not checked yet"
        while True:
            if process is not None and not process.alive():
                raise ProcessExited(component, self.target, process.returncode,
                                    process.log_tail(LOG_TAIL_LINES), log_path)
            try:
                reason = self.check()
            except NotReadyError as error:
                tail = process.log_tail(LOG_TAIL_LINES) if process is not None else ""
                raise StackError(f"{component} at {self.target} failed its readiness check: {error}"
                                 + _format_tail(tail, log_path)) from error
            if reason is None:
                return
            last_error = reason
            now = time.monotonic()
            if now >= deadline:
                tail = process.log_tail(LOG_TAIL_LINES) if process is not None else ""
                raise WaitTimeout(component, self.target, now - started, last_error, tail, log_path)
            time.sleep(min(self.poll_interval_s, max(0.0, deadline - now)))


class PortOpen(WaitStrategy):
    """Ready when a TCP connection to ``host:port`` is accepted."""

    def __init__(self, host: str, port: int, component: str | None = None) -> None:
        super().__init__(component)
        self.host, self.port = host, port
        self.target = f"{host}:{port}"

    def check(self) -> str | None:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return None
        except OSError as error:
            return f"connect failed: {error}"


class HttpOk(WaitStrategy):
    """Ready when ``GET url`` returns a 2xx status."""

    def __init__(self, url: str, component: str | None = None, request_timeout_s: float = 5.0) -> None:
        super().__init__(component)
        self.target = url
        self.request_timeout_s = request_timeout_s

    def check(self) -> str | None:
        response, failure = _get(self.target, self.request_timeout_s)
        if failure is not None:
            return failure
        if 200 <= response.status_code < 300:
            return None
        return f"GET returned {response.status_code}: {response.text[:200]}"


class GrpcHealthy(WaitStrategy):
    """Ready when ``SglangScheduler/HealthCheck`` at ``host:port`` returns healthy=true."""

    def __init__(self, address: str, component: str | None = None, request_timeout_s: float = 5.0) -> None:
        super().__init__(component)
        self.target = f"grpc://{address}"
        self.address = address
        self.request_timeout_s = request_timeout_s

    def check(self) -> str | None:
        import grpc
        from smg_grpc_proto.generated import sglang_scheduler_pb2, sglang_scheduler_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
            try:
                response = stub.HealthCheck(sglang_scheduler_pb2.HealthCheckRequest(),
                                            timeout=self.request_timeout_s)
            except grpc.RpcError as error:
                return f"HealthCheck failed: {error.code().name}: {error.details()}"
        if response.healthy:
            return None
        return f"HealthCheck returned healthy=false: {response.message}"


class LogMatches(WaitStrategy):
    """Ready when a line of the log file matches ``pattern`` (the process's log by default)."""

    def __init__(self, pattern: str, log_path: Path | str | None = None, component: str | None = None) -> None:
        super().__init__(component)
        self.pattern = re.compile(pattern)
        self.log_path = Path(log_path) if log_path else None
        self.target = f"log line /{pattern}/"

    def wait(self, process: "ManagedProcess | None", timeout: float) -> None:
        if self.log_path is None:
            if process is None:
                raise ValueError("LogMatches needs a log_path when no process is given")
            self.log_path = process.log_path
        self.target = f"log line /{self.pattern.pattern}/ in {self.log_path}"
        super().wait(process, timeout)

    def check(self) -> str | None:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "log file does not exist yet"
        if any(self.pattern.search(line) for line in text.splitlines()):
            return None
        return "no matching line yet"


# Error codes and messages with which the router rejects a chat request while it is still
# registering the worker or loading the tokenizer. Each goes away when waiting longer.
# sglang-router 0.3.x sends tokenizer_not_found, smg sends tokenizer_not_ready.
# smg 1.11.0 responds 404 model_not_found ("No worker available for model ...") until the worker
# it registers in the background has joined.
RETRYABLE_CHAT_ERRORS = ("tokenizer_not_found", "tokenizer_not_ready", "no available workers",
                         "no healthy workers", "no workers available", "no_available_workers",
                         "no worker available")


class ChatSucceeds(WaitStrategy):
    """Ready when ``POST base_url/v1/chat/completions`` with a tiny body returns 200.

    Retries on connection errors, any 5xx, and a 4xx whose body names one of
    ``RETRYABLE_CHAT_ERRORS``; any other 4xx fails the wait at once.
    """

    poll_interval_s = 0.5

    def __init__(self, base_url: str, model: str, component: str | None = None,
                 request_timeout_s: float = 60.0, retryable: Sequence[str] = RETRYABLE_CHAT_ERRORS) -> None:
        super().__init__(component)
        self.target = base_url.rstrip("/") + "/v1/chat/completions"
        self.body = {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
            "temperature": 0,
            "stream": False,
        }
        self.request_timeout_s = request_timeout_s
        self.retryable = tuple(text.lower() for text in retryable)

    def check(self) -> str | None:
        import requests

        try:
            response = requests.post(self.target, json=self.body, timeout=self.request_timeout_s)
        except requests.RequestException as error:
            return f"POST failed: {type(error).__name__}: {error}"
        if response.status_code == 200:
            return None
        summary = f"POST returned {response.status_code}: {_short_body(response.text)}"
        if response.status_code >= 500 or any(text in response.text.lower() for text in self.retryable):
            return summary
        raise NotReadyError(summary)


def _get(url: str, timeout_s: float):
    """GET ``url``; return (response, None), or (None, why the request failed)."""
    import requests

    try:
        return requests.get(url, timeout=timeout_s), None
    except requests.RequestException as error:
        return None, f"GET failed: {type(error).__name__}: {error}"


def _short_body(text: str, limit: int = 300) -> str:
    try:
        text = json.dumps(json.loads(text), separators=(",", ":"))
    except ValueError:
        pass
    return text if len(text) <= limit else text[:limit] + "..."


class AllOf(WaitStrategy):
    """Ready when every strategy passes, checked in order; the timeout covers all of them."""

    def __init__(self, strategies: Sequence[WaitStrategy], component: str | None = None) -> None:
        super().__init__(component)
        self.strategies = list(strategies)

    def wait(self, process: "ManagedProcess | None", timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for strategy in self.strategies:
            if strategy.component is None:
                strategy.component = self.component
            strategy.wait(process, max(0.0, deadline - time.monotonic()))


class WorkerListed(WaitStrategy):
    """Ready when the router's ``GET /workers`` lists a worker with URL ``worker_url``.

    Both sglang-router 0.3.2 and smg 1.13.0 return ``{"workers": [{"url": ...}, ...]}``.
    """

    def __init__(self, base_url: str, worker_url: str, component: str | None = None,
                 request_timeout_s: float = 5.0) -> None:
        super().__init__(component)
        self.target = base_url.rstrip("/") + "/workers"
        self.worker_url = worker_url
        self.request_timeout_s = request_timeout_s

    def check(self) -> str | None:
        response, failure = _get(self.target, self.request_timeout_s)
        if failure is not None:
            return failure
        if response.status_code != 200:
            return f"GET returned {response.status_code}: {_short_body(response.text)}"
        try:
            workers = response.json().get("workers") or []
        except (ValueError, AttributeError):
            return f"GET returned a body that is not a JSON object: {_short_body(response.text)}"
        urls = [worker.get("url") for worker in workers if isinstance(worker, dict)]
        if self.worker_url in urls:
            return None
        return f"{self.worker_url} not among the listed workers {urls}"
