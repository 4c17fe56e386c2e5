"""A fake sglang gRPC scheduler for tests: canned token ids, raw bytes kept for comparison.

It serves ``SglangScheduler`` (Generate, HealthCheck, Abort, GetModelInfo, GetServerInfo)
plus ``/test.Echo/Reverse``, a method the tap has no stubs for. Handlers take and return
raw bytes, so tests can compare what crossed the wire with what the client sent.

Generate behaviour is chosen by the request id's prefix:
- ``error-``: one GenerateError (field 4 of GenerateResponse, as sglang 0.5.7 sends it);
- ``status-``: one chunk, then the call ends with INVALID_ARGUMENT;
- ``slow-``: one chunk every 50 ms until 200 chunks or the call is cancelled;
- anything else: one chunk per output id when ``stream`` is set, then GenerateComplete.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from typing import Any, Iterator

import grpc
from google.protobuf import struct_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

SERVICE = "sglang.grpc.scheduler.SglangScheduler"
ECHO_METHOD = "/test.Echo/Reverse"

# Gemma 3 270M's tokenizer facts, so a router in front of the fake registers a believable worker.
MODEL_INFO = {
    "vocab_size": 262144,
    "eos_token_ids": [1, 106],
    "bos_token_id": 2,
    "pad_token_id": 0,
    "max_context_length": 32768,
}


def encode_length_delimited(field_number: int, payload: bytes) -> bytes:
    """Encode one length-delimited protobuf field (wire type 2) by hand."""
    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                return bytes(out)

    return varint((field_number << 3) | 2) + varint(len(payload)) + payload


def generate_error_bytes(request_id: str, message: str, http_status_code: str) -> bytes:
    """Encode GenerateResponse{request_id, error=GenerateError{message, http_status_code}}."""
    error = encode_length_delimited(1, message.encode()) + encode_length_delimited(2, http_status_code.encode())
    return encode_length_delimited(1, request_id.encode()) + encode_length_delimited(4, error)


def output_ids_for(prompt_ids: list[int], length: int = 4) -> list[int]:
    """Derive distinct output ids from the prompt, so concurrent calls cannot be confused."""
    base = (sum(prompt_ids) * 31 + len(prompt_ids)) % 50000 + 1000
    return [base + step for step in range(length - 1)] + [106]


class FakeScheduler:
    """The servicer plus what it saw: raw request bytes, sent response bytes, metadata, cancels."""

    def __init__(self, served_model_name: str = "google/gemma-3-270m-it", model_path: str = "") -> None:
        self.served_model_name = served_model_name
        self.model_path = model_path
        self.lock = threading.Lock()
        self.requests: dict[str, bytes] = {}
        self.responses: dict[str, list[bytes]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.time_remaining: dict[str, float] = {}
        self.cancelled: dict[str, threading.Event] = {}
        self.unary_calls: list[str] = []
        self.server: grpc.Server | None = None
        self.address = ""

    # -- server lifecycle ------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1") -> str:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        self.server.add_generic_rpc_handlers([self._handlers()])
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "test.Echo", {"Reverse": grpc.unary_unary_rpc_method_handler(self._reverse)})])
        port = self.server.add_insecure_port(f"{host}:0")
        self.server.start()
        self.address = f"{host}:{port}"
        return self.address

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None

    def __enter__(self) -> "FakeScheduler":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handlers(self) -> grpc.GenericRpcHandler:
        def unary(function: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(function)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(self._generate),
            "HealthCheck": unary(self._health_check),
            "Abort": unary(self._abort),
            "GetModelInfo": unary(self._model_info),
            "GetServerInfo": unary(self._server_info),
        })

    # -- unary methods -----------------------------------------------------------------------

    def _note_unary(self, name: str) -> None:
        with self.lock:
            self.unary_calls.append(name)

    def _reverse(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note_unary("Reverse")
        return request[::-1]

    def _health_check(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note_unary("HealthCheck")
        return pb.HealthCheckResponse(healthy=True, message="ok").SerializeToString()

    def _abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note_unary("Abort")
        return pb.AbortResponse(success=True).SerializeToString()

    def _model_info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note_unary("GetModelInfo")
        return pb.GetModelInfoResponse(
            model_path=self.model_path or self.served_model_name,
            tokenizer_path=self.model_path or self.served_model_name,
            is_generation=True,
            served_model_name=self.served_model_name,
            max_context_length=MODEL_INFO["max_context_length"],
            vocab_size=MODEL_INFO["vocab_size"],
            model_type="gemma3_text",
            eos_token_ids=MODEL_INFO["eos_token_ids"],
            pad_token_id=MODEL_INFO["pad_token_id"],
            bos_token_id=MODEL_INFO["bos_token_id"],
            max_req_input_len=MODEL_INFO["max_context_length"] - 1,
            architectures=["Gemma3ForCausalLM"],
        ).SerializeToString()

    def _server_info(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._note_unary("GetServerInfo")
        server_args = struct_pb2.Struct()
        server_args.update({"model_path": self.model_path or self.served_model_name,
                            "served_model_name": self.served_model_name, "tp_size": 1, "dp_size": 1})
        return pb.GetServerInfoResponse(
            server_args=server_args, sglang_version="0.5.7", server_type="grpc", uptime_seconds=1.0,
        ).SerializeToString()

    # -- Generate -------------------------------------------------------------------------

    def _generate(self, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        request = pb.GenerateRequest.FromString(data)
        request_id = request.request_id
        cancelled = threading.Event()
        context.add_callback(lambda: cancelled.set() if not context.is_active() else None)
        with self.lock:
            self.requests[request_id] = data
            self.responses[request_id] = []
            self.metadata[request_id] = {key: value for key, value in context.invocation_metadata()}
            self.time_remaining[request_id] = context.time_remaining()
            self.cancelled[request_id] = cancelled
        context.send_initial_metadata((("x-fake-initial", request_id),))
        context.set_trailing_metadata((("x-fake-trailing", "done"),))

        def send(message: bytes) -> bytes:
            with self.lock:
                self.responses[request_id].append(message)
            return message

        if request_id.startswith("error-"):
            yield send(generate_error_bytes(request_id, "fake failure", "500"))
            return

        prompt_ids = list(request.tokenized.input_ids)
        if request_id.startswith("status-"):
            yield send(self._chunk(request_id, [7], len(prompt_ids), 1))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake invalid argument")

        if request_id.startswith("slow-"):
            for step in range(200):
                if cancelled.is_set() or not context.is_active():
                    return
                yield send(self._chunk(request_id, [1000 + step], len(prompt_ids), step + 1))
                time.sleep(0.05)
            return

        output_ids = output_ids_for(prompt_ids)
        if request.stream:
            for position, token_id in enumerate(output_ids):
                yield send(self._chunk(request_id, [token_id], len(prompt_ids), position + 1))
        yield send(pb.GenerateResponse(
            request_id=request_id,
            complete=pb.GenerateComplete(
                output_ids=[] if request.stream else output_ids,
                finish_reason="stop",
                matched_token_id=106,
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(output_ids),
                cached_tokens=0,
            ),
        ).SerializeToString())

    @staticmethod
    def _chunk(request_id: str, token_ids: list[int], prompt_tokens: int, completion_tokens: int) -> bytes:
        return pb.GenerateResponse(
            request_id=request_id,
            chunk=pb.GenerateStreamChunk(token_ids=token_ids, prompt_tokens=prompt_tokens,
                                         completion_tokens=completion_tokens),
        ).SerializeToString()
