"""A recording gRPC proxy between the router and the server.

Every RPC, including methods the tap has no stubs for, is forwarded as raw bytes. The
server side uses a generic handler without deserializers and the client side a channel
without serializers, so each side receives byte for byte what the other sent. Every
method is proxied as a bidirectional stream, which is the same on the wire as unary and
server-streaming calls. Client metadata, the deadline
and cancellation are passed upstream; the server's initial and trailing metadata, status
code and details are passed back.

For ``SglangScheduler/Generate`` the tap also parses a copy of each message and records
the request, every stream chunk, every ``GenerateComplete`` and any ``GenerateError`` as
one ``harness.capture.WireRecord`` per call. Each finished call is appended to the record
file as one JSON line (``"kind": "generate"``). Every other call is appended as a small
``"kind": "call"`` line with its method and status.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from smg_grpc_proto.generated import sglang_scheduler_pb2

from harness.capture import TokenLogprob, WireCompletion, WireRecord, WireRequest, _wire_from_dict
from harness.lifecycle import StartStop

log = logging.getLogger(__name__)

SERVICE = "sglang.grpc.scheduler.SglangScheduler"
GENERATE_METHOD = f"/{SERVICE}/Generate"

# No limit on message size in either direction: the tap must not reject what the server
# would accept (gRPC's default receive limit is 4 MiB).
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 0),
]

# A server-side deadline further away than this means the client set none.
_NO_DEADLINE_S = 1e7


def _build_error_message_class() -> type:
    """Build a message class for ``GenerateResponse.error`` (field 4).

    sglang 0.5.7 reports Generate failures as ``GenerateError`` in field 4 of
    ``GenerateResponse``. smg-grpc-proto 0.4.28 reserves field 4 (later servers use the
    gRPC status), so its stubs keep it as an unknown field. This class reads only fields
    1 and 4 of the same bytes.
    """
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="harness/tap_generate_error.proto", package="harness.tap", syntax="proto3")
    error_type = file_proto.message_type.add(name="GenerateError")
    for number, name in enumerate(("message", "http_status_code", "details"), start=1):
        error_type.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                             label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    response_type = file_proto.message_type.add(name="GenerateResponseError")
    response_type.field.add(name="request_id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    response_type.field.add(name="error", number=4, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                            type_name=".harness.tap.GenerateError",
                            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("harness.tap.GenerateResponseError"))


GenerateResponseError = _build_error_message_class()


# ---------------------------------------------------------------------------------------
# Parsing Generate messages into records


def sampling_params_to_dict(params: sglang_scheduler_pb2.SamplingParams) -> tuple[dict[str, Any], list[str]]:
    """Convert sampling params to a dict with proto field names, plus the fields set on the wire.

    Fields without presence appear with their proto3 default when unset (0, "", false).
    Fields with presence (``max_new_tokens``, ``stream_interval``, the ``constraint`` oneof,
    ``custom_params``) appear as None when unset. Float fields are float32 on the wire, so
    0.7 is printed as the shortest decimal that reads back to the same float32.
    """
    values = json_format.MessageToDict(
        params, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for field_descriptor in params.DESCRIPTOR.fields:
        values.setdefault(field_descriptor.name, None)
    set_fields = sorted(field_descriptor.name for field_descriptor, _ in params.ListFields())
    return values, set_fields


def _logprobs_to_list(output_logprobs: sglang_scheduler_pb2.OutputLogProbs) -> list[TokenLogprob]:
    items = []
    for position, logprob in enumerate(output_logprobs.token_logprobs):
        token_id = output_logprobs.token_ids[position] if position < len(output_logprobs.token_ids) else None
        top: list[tuple[int | str, float]] = []
        if position < len(output_logprobs.top_logprobs):
            alternatives = output_logprobs.top_logprobs[position]
            top = [(int(alt_id), float(value)) for alt_id, value in zip(alternatives.token_ids, alternatives.values)]
        items.append(TokenLogprob(logprob=float(logprob), token_id=token_id, top=top))
    return items


class _GenerateRecorder:
    """Collects one Generate call: parses copies of its messages, never alters them."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.request: WireRequest | None = None
        self.chunks: list[dict[str, Any]] = []
        self.completions: list[WireCompletion] = []
        self.error: str | None = None
        self.error_http_status: str | None = None
        self.parse_errors: list[str] = []

    def on_request(self, data: bytes) -> None:
        try:
            request = sglang_scheduler_pb2.GenerateRequest.FromString(data)
        except Exception as error:  # noqa: BLE001 - a parse failure must not break forwarding
            log.warning("tap could not parse a GenerateRequest of %d bytes: %s", len(data), error)
            self.parse_errors.append(f"GenerateRequest: {error}")
            return
        sampling_params, set_fields = sampling_params_to_dict(request.sampling_params)
        self.request = WireRequest(
            request_id=request.request_id,
            prompt_ids=list(request.tokenized.input_ids),
            original_text=request.tokenized.original_text,
            sampling_params=sampling_params,
            stream=request.stream,
            return_logprob=request.return_logprob,
            top_logprobs_num=request.top_logprobs_num,
            sampling_params_set=set_fields,
            has_sampling_params=request.HasField("sampling_params"),
        )

    def on_response(self, data: bytes) -> None:
        try:
            response = sglang_scheduler_pb2.GenerateResponse.FromString(data)
        except Exception as error:  # noqa: BLE001 - a parse failure must not break forwarding
            request_id = self.request.request_id if self.request else "?"
            log.warning("tap could not parse a GenerateResponse of request %s: %s", request_id, error)
            self.parse_errors.append(f"GenerateResponse: {error}")
            return
        kind = response.WhichOneof("response")
        if kind == "chunk":
            self.chunks.append(self._chunk_to_dict(response.chunk))
        elif kind == "complete":
            self.completions.append(self._completion(response.complete))
        else:
            error_response = GenerateResponseError.FromString(data)
            if error_response.HasField("error"):
                self.error = error_response.error.message
                self.error_http_status = error_response.error.http_status_code or None
            else:
                self.parse_errors.append("GenerateResponse with neither chunk, complete nor error")

    @staticmethod
    def _chunk_to_dict(chunk: sglang_scheduler_pb2.GenerateStreamChunk) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "index": chunk.index,
            "token_ids": list(chunk.token_ids),
            "prompt_tokens": chunk.prompt_tokens,
            "completion_tokens": chunk.completion_tokens,
            "cached_tokens": chunk.cached_tokens,
            "received_at": time.time(),
        }
        if chunk.HasField("output_logprobs"):
            entry["logprobs"] = [dataclasses.asdict(item) for item in _logprobs_to_list(chunk.output_logprobs)]
        return entry

    @staticmethod
    def _completion(complete: sglang_scheduler_pb2.GenerateComplete) -> WireCompletion:
        matched = complete.WhichOneof("matched_stop")
        matched_stop = getattr(complete, matched) if matched else None
        return WireCompletion(
            index=complete.index,
            output_ids=list(complete.output_ids),
            finish_reason=complete.finish_reason,
            matched_stop=matched_stop,
            prompt_tokens=complete.prompt_tokens,
            completion_tokens=complete.completion_tokens,
            cached_tokens=complete.cached_tokens,
            logprobs=_logprobs_to_list(complete.output_logprobs) if complete.HasField("output_logprobs") else None,
        )

    def finish(self, status_code: str, details: str, cancelled: bool) -> WireRecord:
        request = self.request or WireRequest(request_id="", prompt_ids=[], original_text="",
                                              sampling_params={}, stream=False)
        error = self.error
        if error is None and status_code != "OK":
            error = f"{status_code}: {details}"
        if self.parse_errors:
            # NOTE: a message the stubs cannot parse is still forwarded; only its record is partial.
            error = "; ".join(filter(None, [error, "tap could not parse " + ", ".join(self.parse_errors)]))
        return WireRecord(
            request=request,
            chunks=self.chunks,
            completions=self.completions,
            error=error,
            status_code=status_code,
            error_http_status=self.error_http_status,
            cancelled=cancelled,
            started_at=self.started_at,
            elapsed_s=time.time() - self.started_at,
        )


# ---------------------------------------------------------------------------------------
# The proxy


def _forwardable_metadata(metadata: Any) -> list[tuple[str, Any]]:
    """Drop the headers gRPC sets itself (pseudo-headers, grpc-*, user-agent)."""
    forwarded = []
    for key, value in metadata or ():
        if key.startswith(":") or key.startswith("grpc-") or key == "user-agent":
            continue
        forwarded.append((key, value))
    return forwarded


class _ForwardAll(grpc.GenericRpcHandler):
    def __init__(self, tap: "Tap") -> None:
        self._tap = tap

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        def forward(request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            return self._tap._forward(method, request_iterator, context)

        # Without a deserializer and a serializer the handler receives and returns raw bytes.
        return grpc.stream_stream_rpc_method_handler(forward)


class Tap(StartStop):
    """A recording proxy: ``listen`` and ``upstream`` are "host:port"; port 0 picks a free port.

    ``record_path`` receives one JSON line per finished call; None keeps records in memory only.
    """

    def __init__(self, listen: str, upstream: str, record_path: Path | str | None, max_workers: int = 256) -> None:
        self.listen = listen
        self.upstream = upstream
        self.record_path = Path(record_path) if record_path else None
        self.max_workers = max_workers
        self.address: str | None = None
        self._server: grpc.Server | None = None
        self._channel: grpc.Channel | None = None
        self._record_file: Any = None
        self._lock = threading.Condition()
        self._records: list[WireRecord] = []
        self._calls: list[dict[str, Any]] = []
        self._generate_in_flight = 0

    def start(self) -> None:
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            self._record_file = open(self.record_path, "a", encoding="utf-8")
        self._channel = grpc.insecure_channel(self.upstream, options=_CHANNEL_OPTIONS)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="tap"),
            handlers=[_ForwardAll(self)],
            options=_CHANNEL_OPTIONS,
        )
        host = self.listen.rsplit(":", 1)[0]
        try:
            port = self._server.add_insecure_port(self.listen)
        except RuntimeError as error:
            raise OSError(f"tap cannot listen on {self.listen}: {error}") from error
        if port == 0:
            raise OSError(f"tap cannot listen on {self.listen}: the address is invalid or in use")
        self.address = f"{host}:{port}"
        self._server.start()
        log.info("tap listening on %s, forwarding to %s, recording to %s",
                 self.address, self.upstream, self.record_path or "memory")

    def stop(self, grace: float = 1.0) -> None:
        """Stop listening (calls in flight get ``grace`` seconds), then close the record file."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        with self._lock:
            if self._record_file is not None:
                self._record_file.close()
                self._record_file = None

    # -- records --------------------------------------------------------------------------

    @property
    def record_count(self) -> int:
        """Return the number of finished Generate calls recorded so far."""
        with self._lock:
            return len(self._records)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._generate_in_flight

    def records(self) -> list[WireRecord]:
        with self._lock:
            return list(self._records)

    def calls(self) -> list[dict[str, Any]]:
        """Return the non-Generate calls: method, status code, sizes and duration."""
        with self._lock:
            return list(self._calls)

    def records_since(self, mark: int, wait_s: float = 2.0) -> list[WireRecord]:
        """Return the Generate records after ``mark``, first waiting up to ``wait_s`` for calls in flight."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while self._generate_in_flight and time.monotonic() < deadline:
                self._lock.wait(max(0.0, deadline - time.monotonic()))
            return list(self._records[mark:])

    def _write_line(self, entry: dict[str, Any]) -> None:
        # Called with self._lock held.
        if self._record_file is not None:
            self._record_file.write(json.dumps(entry, sort_keys=True) + "\n")
            self._record_file.flush()

    def _store_generate(self, record: WireRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._generate_in_flight -= 1
            self._write_line({"kind": "generate", **dataclasses.asdict(record)})
            self._lock.notify_all()

    def _store_call(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._calls.append(entry)
            self._write_line({"kind": "call", **entry})

    # -- forwarding -----------------------------------------------------------------------

    def _forward(self, method: str, request_iterator: Iterator[bytes],
                 context: grpc.ServicerContext) -> Iterator[bytes]:
        recorder = _GenerateRecorder() if method == GENERATE_METHOD else None
        if recorder is not None:
            with self._lock:
                self._generate_in_flight += 1
        started = time.time()
        sizes = {"request_bytes": 0, "response_bytes": 0}

        def observed_requests() -> Iterator[bytes]:
            for request in request_iterator:
                sizes["request_bytes"] += len(request)
                if recorder is not None:
                    recorder.on_request(request)
                yield request

        requests = observed_requests()
        if recorder is not None:
            # Generate takes exactly one request message, so reading it before the upstream
            # call starts cannot stall the call, and the record has the request even when
            # the upstream call fails at once.
            first = list(itertools.islice(requests, 1))
            requests = itertools.chain(first, requests)

        remaining = context.time_remaining()
        timeout = None if remaining is None or remaining > _NO_DEADLINE_S else remaining
        status_code, details = "OK", ""
        try:
            call = self._channel.stream_stream(method)(
                requests, timeout=timeout,
                metadata=_forwardable_metadata(context.invocation_metadata()))
            # Runs when this RPC ends for any reason; cancelling a finished call does nothing.
            # add_callback returns False when the RPC has already ended.
            if not context.add_callback(call.cancel):
                call.cancel()
            try:
                context.send_initial_metadata(call.initial_metadata() or ())
                for response in call:
                    sizes["response_bytes"] += len(response)
                    if recorder is not None:
                        recorder.on_response(response)
                    yield response
                context.set_trailing_metadata(call.trailing_metadata() or ())
            except grpc.RpcError as error:
                status_code, details = error.code().name, error.details() or ""
                log.info("tap: %s ended with %s: %s", method, status_code, details)
                if context.is_active():
                    context.set_trailing_metadata(error.trailing_metadata() or ())
                    context.set_code(error.code())
                    context.set_details(details)
        except GeneratorExit:
            # The server closed this generator: the client went away mid-stream.
            status_code, details = "CANCELLED", "client cancelled"
            raise
        finally:
            cancelled = status_code == "CANCELLED" or not context.is_active()
            if recorder is not None:
                self._store_generate(recorder.finish(status_code, details, cancelled))
            else:
                self._store_call({
                    "method": method,
                    "status_code": status_code,
                    "details": details,
                    "cancelled": cancelled,
                    "started_at": started,
                    "elapsed_s": time.time() - started,
                    **sizes,
                })


def read_records(path: Path | str) -> list[WireRecord]:
    """Read the Generate records of a record file, in the order the calls finished."""
    records = []
    with open(path, encoding="utf-8") as record_file:
        for line in record_file:
            if not line.strip():
                continue
            entry = json.loads(line)
            if entry.pop("kind", "generate") == "generate":
                records.append(_wire_from_dict(entry))
    return records


def read_calls(path: Path | str) -> list[dict[str, Any]]:
    """Read the non-Generate call entries of a record file."""
    with open(path, encoding="utf-8") as record_file:
        entries = [json.loads(line) for line in record_file if line.strip()]
    return [entry for entry in entries if entry.get("kind") == "call"]


def _address(flag: str):
    """Return an argparse type that accepts HOST:PORT with a port from 1 to 65535."""

    def parse(value: str) -> str:
        host, separator, port = value.rpartition(":")
        if not separator or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{flag} must be HOST:PORT with a port from 1 to 65535, got {value!r}")
        return value

    return parse


def main(argv: list[str]) -> int:
    """Run ``python -m harness tap --listen HOST:PORT --upstream HOST:PORT --record FILE``."""
    parser = argparse.ArgumentParser(prog="python -m harness tap", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, type=_address("--listen"), help="address the router connects to, HOST:PORT")
    parser.add_argument("--upstream", required=True, type=_address("--upstream"), help="the server's gRPC address, HOST:PORT")
    parser.add_argument("--record", required=True, type=Path, help="JSON-lines file the calls are appended to")
    args = parser.parse_args(argv)
    if args.record.is_dir():
        parser.error(f"--record {args.record} is a folder; give a file path")

    tap = Tap(args.listen, args.upstream, args.record)
    try:
        tap.start()
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    stopping = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("tap received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stopping.wait(1.0):
        pass
    tap.stop()
    log.info("tap stopped after %d Generate calls and %d other calls", tap.record_count, len(tap.calls()))
    return 0
