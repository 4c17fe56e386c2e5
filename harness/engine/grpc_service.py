"""``sglang.grpc.scheduler.SglangScheduler`` as sglang 0.5.7 serves it in --grpc-mode.

Read from sglang 0.5.7's ``srt/entrypoints/grpc_server.py`` and ``srt/grpc/grpc_request_manager.py``:

- ``Generate`` takes token ids. Without ``stream`` it returns one GenerateComplete per sample
  with every output id and cumulative logprobs. With ``stream`` it sends a
  GenerateStreamChunk per step with the new ids and cumulative counts, and the last step's
  ids arrive in the GenerateComplete itself (so a stream's Complete holds only the tail).
- Errors are a GenerateError with ``http_status_code`` as a string, in field 4 of
  GenerateResponse. smg-grpc-proto 0.4.28 dropped that message, so this module declares it
  (``GenerateErrorResponse`` below) and sends its bytes, which parse as 0.5.7's
  GenerateResponse with ``error`` set.
- ``HealthCheck`` generates one token from input [0]; ``Abort`` and a cancelled call both
  abort the request. RPCs that 0.5.7 does not have return UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent import futures
from typing import Any, Iterator

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from harness.engine.sampling import SamplingConfig
from harness.engine.scheduler import FinishEvent, GenerateInput, RequestError, Scheduler, TokenEvent

log = logging.getLogger(__name__)

# Version reported in GetServerInfo: the sglang release whose contract this engine follows.
SGLANG_CONTRACT_VERSION = "0.5.7"
SERVICE_NAME = "sglang.grpc.scheduler.SglangScheduler"
HEALTH_CHECK_TIMEOUT_S = 20.0
# Seconds a Generate call waits for its next event before it checks whether the client left.
EVENT_POLL_S = 0.5


def _declare_error_messages() -> tuple[type, type]:
    """Declare sglang 0.5.7's GenerateError and a GenerateResponse holding only request_id and error."""
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="harness_engine_generate_error.proto", package="harness.engine", syntax="proto3"
    )
    error = file_proto.message_type.add(name="GenerateError")
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    for number, name in ((1, "message"), (2, "http_status_code"), (3, "details")):
        error.field.add(name=name, number=number, type=string, label=optional)
    response = file_proto.message_type.add(name="GenerateErrorResponse")
    response.field.add(name="request_id", number=1, type=string, label=optional)
    response.field.add(
        name="error",
        number=4,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        label=optional,
        type_name=".harness.engine.GenerateError",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    error_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("harness.engine.GenerateError"))
    response_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("harness.engine.GenerateErrorResponse"))
    return error_class, response_class


# GenerateErrorResponse parses the same bytes as a GenerateResponse: clients use
# ``GenerateErrorResponse.FromString(raw)`` to read field 4, which the 0.4.28 stubs drop.
GenerateError, GenerateErrorResponse = _declare_error_messages()


def sampling_from_proto(params: pb.SamplingParams) -> SamplingConfig:
    """Convert proto3 sampling params the way sglang 0.5.7's gRPC server does.

    Numeric fields are passed through as sent, so a proto3 default of 0 stays 0 and
    temperature 0 means greedy. An unset max_new_tokens becomes None, and sglang then lets
    the request run to the context limit. Empty stop lists mean no stop strings or ids.
    """
    config = SamplingConfig(
        max_new_tokens=params.max_new_tokens if params.HasField("max_new_tokens") else None,
        min_new_tokens=params.min_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        repetition_penalty=params.repetition_penalty,
        stop=list(params.stop),
        stop_token_ids=set(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        skip_special_tokens=params.skip_special_tokens,
        spaces_between_special_tokens=params.spaces_between_special_tokens,
        no_stop_trim=params.no_stop_trim,
        n=params.n or 1,
        logit_bias={int(key): value for key, value in params.logit_bias.items()},
    )
    if config.top_k == 0:
        # NOTE: 0 is the proto3 default when a client leaves top_k unset. sglang 0.5.7 passes
        # it unchecked to its GPU sampler; the engine reads it as "no top-k filter".
        config.top_k = None
    if params.HasField("custom_params"):
        seed = dict(params.custom_params).get("sampling_seed")
        if seed is not None:
            config.seed = int(seed)
    # sglang normalizes gRPC requests without a tokenizer, so the length is in characters.
    config.stop_str_max_len = max((len(stop) for stop in config.stop), default=0)
    return config.normalize()


def _output_logprobs(
    values: list[float] | None, ids: list[int], top_values: list[list[float]] | None, top_ids: list[list[int]] | None
) -> pb.OutputLogProbs | None:
    if values is None:
        return None
    tops = [pb.TopLogProbs(values=v, token_ids=i) for v, i in zip(top_values or [], top_ids or []) if v]
    return pb.OutputLogProbs(token_logprobs=values, token_ids=ids, top_logprobs=tops)


def complete_response(request_id: str, event: FinishEvent, stream: bool) -> pb.GenerateResponse:
    """Build the GenerateComplete of one finished sample."""
    start = event.streamed_count if stream else 0
    output_ids = event.output_ids[start:]
    reason = event.finish_reason
    matched: dict[str, Any] = {}
    if "matched" in reason:
        if isinstance(reason["matched"], int):
            matched["matched_token_id"] = reason["matched"]
        elif isinstance(reason["matched"], str):
            matched["matched_stop_str"] = reason["matched"]
    logprobs = None
    if event.logprobs is not None:
        logprobs = _output_logprobs(
            event.logprobs[start:],
            output_ids,
            event.top_values[start:] if event.top_values is not None else None,
            event.top_ids[start:] if event.top_ids is not None else None,
        )
    finish_reason = reason["type"] if reason["type"] in ("length", "abort") else "stop"
    return pb.GenerateResponse(
        request_id=request_id,
        complete=pb.GenerateComplete(
            output_ids=output_ids,
            finish_reason=finish_reason,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_tokens=0,
            output_logprobs=logprobs,
            index=event.index,
            **matched,
        ),
    )


def chunk_response(request_id: str, event: TokenEvent) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id,
        chunk=pb.GenerateStreamChunk(
            token_ids=event.token_ids,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cached_tokens=0,
            output_logprobs=_output_logprobs(event.logprobs, event.token_ids, event.top_values, event.top_ids),
            index=event.index,
        ),
    )


def error_response(request_id: str, message: str, status: int) -> Any:
    return GenerateErrorResponse(
        request_id=request_id,
        error=GenerateError(message=message, http_status_code=str(status)),
    )


class SchedulerServicer:
    """The five RPCs sglang 0.5.7 serves to the router, on top of the engine's scheduler."""

    def __init__(self, scheduler: Scheduler, server_args: dict[str, Any]):
        self.scheduler = scheduler
        self.metadata = scheduler.metadata
        self.server_args = server_args
        self.start_time = time.time()
        self.shutting_down = False

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        request_id = request.request_id or f"grpc-{time.time_ns()}"
        log.info("Generate %s received", request_id)
        if not request.HasField("tokenized"):
            yield error_response(request_id, "Tokenized input must be provided", 500)
            return
        params = sampling_from_proto(request.sampling_params)
        data = GenerateInput(
            input_ids=list(request.tokenized.input_ids),
            params=params,
            request_id=request_id,
            return_logprob=request.return_logprob,
            top_logprobs_num=request.top_logprobs_num,
            stream=request.stream,
        )
        log.debug(
            "Generate %s prompt ids %s, sampling params as sent {%s}, stream=%s, return_logprob=%s",
            request_id,
            data.input_ids,
            text_format.MessageToString(request.sampling_params, as_one_line=True),
            request.stream,
            request.return_logprob,
        )
        try:
            handle = self.scheduler.submit(data)
        except RequestError as error:
            # NOTE: sglang 0.5.7 ends an over-long prompt with a GenerateComplete whose
            # finish_reason is "abort"; the engine sends the same message as a GenerateError.
            log.warning("Generate %s rejected: %s", request_id, error)
            yield error_response(request_id, str(error), error.status)
            return
        context.add_callback(lambda: self._on_call_end(request_id))

        finished: list[FinishEvent] = []
        remaining = max(params.n, 1)
        while remaining:
            try:
                event = handle.events.get(timeout=EVENT_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    self.scheduler.abort(request_id)
                    return
                continue
            if isinstance(event, RequestError):
                yield error_response(request_id, str(event), event.status)
                return
            if isinstance(event, TokenEvent):
                yield chunk_response(request_id, event)
                continue
            remaining -= 1
            if request.stream:
                yield complete_response(request_id, event, stream=True)
            else:
                finished.append(event)
        # NOTE: sglang 0.5.7 leaves index 0 on every non-streamed n > 1 completion; the
        # engine sets each sample's index so a reader can tell them apart.
        for event in sorted(finished, key=lambda e: e.index):
            yield complete_response(request_id, event, stream=False)

    def _on_call_end(self, request_id: str) -> None:
        if self.scheduler.abort(request_id):
            log.info("Generate %s: the call ended before the request finished; aborted", request_id)

    def HealthCheck(self, request: pb.HealthCheckRequest, context: grpc.ServicerContext) -> pb.HealthCheckResponse:
        if self.shutting_down:
            return pb.HealthCheckResponse(healthy=False, message="Server is shutting down")
        healthy, message = run_health_generation(self.scheduler)
        return pb.HealthCheckResponse(healthy=healthy, message=message)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        found = self.scheduler.abort(request.request_id)
        return pb.AbortResponse(
            success=found, message=f"Request {request.request_id} {'aborted' if found else 'not found'}"
        )

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.GetModelInfoResponse:
        meta = self.metadata
        return pb.GetModelInfoResponse(
            model_path=meta.model_path,
            tokenizer_path=meta.model_path,
            is_generation=True,
            served_model_name=meta.served_model_name,
            max_context_length=meta.max_context_length,
            vocab_size=meta.vocab_size,
            supports_vision=False,
            model_type=meta.model_type,
            architectures=meta.architectures,
            eos_token_ids=meta.eos_token_ids,
            pad_token_id=meta.pad_token_id or 0,
            bos_token_id=meta.bos_token_id or 0,
            max_req_input_len=meta.max_req_input_len,
        )

    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext) -> pb.GetServerInfoResponse:
        server_args = Struct()
        server_args.update(self.server_args)
        scheduler_info = Struct()
        scheduler_info.update(
            {"max_total_num_tokens": self.metadata.max_context_length, "max_req_input_len": self.metadata.max_req_input_len}
        )
        start = Timestamp()
        start.FromSeconds(int(self.start_time))
        return pb.GetServerInfoResponse(
            server_args=server_args,
            scheduler_info=scheduler_info,
            active_requests=self.scheduler.active_requests,
            is_paused=False,
            last_receive_timestamp=self.scheduler.last_receive_time,
            uptime_seconds=time.time() - self.start_time,
            sglang_version=SGLANG_CONTRACT_VERSION,
            server_type="grpc",
            start_time=start,
        )


def run_health_generation(scheduler: Scheduler) -> tuple[bool, str]:
    """Generate one greedy token from input [0], as sglang's health checks do."""
    params = SamplingConfig(max_new_tokens=1, temperature=0.0).normalize()
    data = GenerateInput(input_ids=[0], params=params, request_id=f"HEALTH_CHECK_{time.time_ns()}")
    try:
        handle = scheduler.submit(data)
        for event in scheduler.events(handle, timeout=HEALTH_CHECK_TIMEOUT_S):
            if isinstance(event, RequestError):
                return False, f"Health check failed: {event}"
    except queue.Empty:
        return False, f"Health check timeout after {HEALTH_CHECK_TIMEOUT_S:.0f}s"
    except RequestError as error:
        return False, f"Health check failed: {error}"
    return True, "Health check passed"


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _method_handlers(servicer: SchedulerServicer) -> grpc.GenericRpcHandler:
    """Register the five RPCs of sglang 0.5.7; any other method gets UNIMPLEMENTED from grpc."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=pb.GenerateRequest.FromString, response_serializer=_serialize
        ),
        "HealthCheck": grpc.unary_unary_rpc_method_handler(
            servicer.HealthCheck, request_deserializer=pb.HealthCheckRequest.FromString, response_serializer=_serialize
        ),
        "Abort": grpc.unary_unary_rpc_method_handler(
            servicer.Abort, request_deserializer=pb.AbortRequest.FromString, response_serializer=_serialize
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString, response_serializer=_serialize
        ),
        "GetServerInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerInfo,
            request_deserializer=pb.GetServerInfoRequest.FromString,
            response_serializer=_serialize,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def start_grpc_server(servicer: SchedulerServicer, host: str, port: int, workers: int = 16) -> grpc.Server:
    """Start the gRPC listener; raise OSError when the port cannot be bound."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-grpc"),
        options=[
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((_method_handlers(servicer),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        # grpcio 1.7x raises "Failed to bind to address" where older releases returned 0.
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind the gRPC listener to {host}:{port}; choose a free --grpc-port")
    server.start()
    return server
