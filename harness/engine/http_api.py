"""sglang's HTTP API on the engine: health, model and server info, /generate and chat completions.

Built on the standard library's ThreadingHTTPServer, so the engine needs no web framework.
Behaviour follows sglang 0.5.7 (``srt/entrypoints/http_server.py`` and
``srt/entrypoints/openai/serving_chat.py``, ``protocol.py``):

- chat prompts are ``tokenizer.apply_chat_template(messages, tokenize=True,
  add_generation_prompt=True)``, so the template writes <bos> and no special token is added
  again; ``continue_final_message`` drops the last assistant message and appends its encoded
  content (without a leading <bos>);
- ``max_tokens`` wins over ``max_completion_tokens``; temperature, top_p, top_k, min_p and
  repetition_penalty fall back to generation_config.json, then to OpenAI defaults;
- unless ``no_stop_trim`` is set, the text drops the matched stop token and ends before a
  matched stop string. ``skip_special_tokens`` decides whether special tokens appear in it;
- ``separate_reasoning`` has no effect because no reasoning parser is configured.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harness.engine.grpc_service import SGLANG_CONTRACT_VERSION, run_health_generation
from harness.engine.sampling import InvalidParams, SamplingConfig
from harness.engine.scheduler import FinishEvent, GenerateInput, RequestError, Scheduler, TokenEvent

log = logging.getLogger(__name__)

# Names a request may use for the served model besides its served name (sglang's default).
MODEL_NAME_ALIASES = ("default",)
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


class EngineHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: "HttpApi"):
        super().__init__(address, _Handler)
        self.api = api


class HttpApi:
    """The request handlers, independent of the HTTP plumbing."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, server_args: dict[str, Any], generation_defaults: dict):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.metadata = scheduler.metadata
        self.server_args = server_args
        self.generation_defaults = {k: v for k, v in generation_defaults.items() if k in GENERATION_CONFIG_KEYS}

    # -- info ----------------------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "model_path": meta.model_path,
            "tokenizer_path": meta.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": meta.model_type,
            "architectures": meta.architectures,
            "served_model_name": meta.served_model_name,
            "max_context_length": meta.max_context_length,
            "vocab_size": meta.vocab_size,
            "eos_token_ids": meta.eos_token_ids,
            "bos_token_id": meta.bos_token_id,
            "pad_token_id": meta.pad_token_id,
            "max_req_input_len": meta.max_req_input_len,
        }

    def server_info(self) -> dict[str, Any]:
        info = dict(self.server_args)
        info.update(
            {
                "version": SGLANG_CONTRACT_VERSION,
                "max_total_num_tokens": self.metadata.max_context_length,
                "max_req_input_len": self.metadata.max_req_input_len,
                "internal_states": [{"active_requests": self.scheduler.active_requests}],
            }
        )
        return info

    def load(self) -> dict[str, Any]:
        # NOTE: the engine counts requests, not tokens; num_tokens stays 0.
        return {
            "dp_rank": 0,
            "num_reqs": self.scheduler.active_requests,
            "num_waiting_reqs": 0,
            "num_tokens": 0,
            "ts_tic": time.time(),
        }

    def models(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "object": "list",
            "data": [
                {
                    "id": meta.served_model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "sglang",
                    "root": meta.served_model_name,
                    "max_model_len": meta.max_context_length,
                }
            ],
        }

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        known = (self.metadata.served_model_name, self.metadata.model_path, *MODEL_NAME_ALIASES)
        if model is not None and model not in known:
            raise RequestError(
                f"The model '{model}' does not exist; this server serves '{self.metadata.served_model_name}'.", 404
            )

    # -- sampling ------------------------------------------------------------------------

    def _param(self, body: dict[str, Any], name: str) -> Any:
        value = body.get(name)
        if value is None:
            return self.generation_defaults.get(name, OPENAI_DEFAULTS[name])
        return value

    def _stop_str_max_len(self, stops: list[str]) -> int:
        # sglang's TokenizerManager normalizes with the tokenizer: the length is in tokens.
        return max((len(self.tokenizer.encode(s, add_special_tokens=False)) for s in stops), default=0)

    def chat_sampling(self, body: dict[str, Any]) -> SamplingConfig:
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        top_k = self._param(body, "top_k")
        config = SamplingConfig(
            max_new_tokens=body.get("max_tokens") or body.get("max_completion_tokens"),
            min_new_tokens=int(body.get("min_tokens") or 0),
            temperature=float(self._param(body, "temperature")),
            top_p=float(self._param(body, "top_p")),
            top_k=int(top_k),
            min_p=float(self._param(body, "min_p")),
            frequency_penalty=float(body.get("frequency_penalty") or 0.0),
            presence_penalty=float(body.get("presence_penalty") or 0.0),
            repetition_penalty=float(self._param(body, "repetition_penalty")),
            stop=stops,
            stop_token_ids=set(body.get("stop_token_ids") or []),
            ignore_eos=bool(body.get("ignore_eos", False)),
            skip_special_tokens=bool(body.get("skip_special_tokens", True)),
            no_stop_trim=bool(body.get("no_stop_trim", False)),
            n=int(body.get("n") or 1),
            seed=body.get("seed"),
            logit_bias={int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()},
        )
        return self._finish_config(config, stops)

    def native_sampling(self, raw: dict[str, Any]) -> SamplingConfig:
        stop = raw.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        top_k = raw.get("top_k", -1)
        config = SamplingConfig(
            max_new_tokens=raw.get("max_new_tokens", 128),
            min_new_tokens=int(raw.get("min_new_tokens", 0)),
            temperature=float(raw.get("temperature", 1.0)),
            top_p=float(raw.get("top_p", 1.0)),
            top_k=int(top_k),
            min_p=float(raw.get("min_p", 0.0)),
            frequency_penalty=float(raw.get("frequency_penalty", 0.0)),
            presence_penalty=float(raw.get("presence_penalty", 0.0)),
            repetition_penalty=float(raw.get("repetition_penalty", 1.0)),
            stop=stops,
            stop_token_ids=set(raw.get("stop_token_ids") or []),
            ignore_eos=bool(raw.get("ignore_eos", False)),
            skip_special_tokens=bool(raw.get("skip_special_tokens", True)),
            spaces_between_special_tokens=bool(raw.get("spaces_between_special_tokens", True)),
            no_stop_trim=bool(raw.get("no_stop_trim", False)),
            n=int(raw.get("n", 1)),
            seed=raw.get("sampling_seed"),
            logit_bias={int(k): float(v) for k, v in (raw.get("logit_bias") or {}).items()},
        )
        return self._finish_config(config, stops)

    def _finish_config(self, config: SamplingConfig, stops: list[str]) -> SamplingConfig:
        config.stop_str_max_len = self._stop_str_max_len(stops)
        config.normalize()
        # verify runs after normalize in sglang, so temperature 0 passes as greedy.
        try:
            config.verify(self.metadata.vocab_size)
        except InvalidParams as error:
            raise RequestError(str(error), 400) from error
        if config.max_new_tokens is not None and config.max_new_tokens > self.metadata.max_context_length:
            raise RequestError(f"max_completion_tokens is too large: {config.max_new_tokens}.", 400)
        return config

    # -- text ----------------------------------------------------------------------------

    def output_text(self, output_ids: list[int], reason: dict[str, Any], params: SamplingConfig) -> str:
        """Decode output ids as sglang's detokenizer does, trimming the matched stop."""
        ids = list(output_ids)
        matched = reason.get("matched")
        if not params.no_stop_trim and isinstance(matched, int) and not isinstance(matched, bool) and ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(
            ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        if not params.no_stop_trim and isinstance(matched, str):
            position = text.find(matched)
            if position != -1:
                text = text[:position]
        return text

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def render_chat(self, body: dict[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", 400)
        messages = [dict(m) for m in messages]
        prefix = None
        if body.get("continue_final_message") and messages[-1].get("role") == "assistant":
            prefix = messages.pop()["content"]
        kwargs = dict(body.get("chat_template_kwargs") or {})
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, tools=body.get("tools"), **kwargs
            )
        except Exception as error:  # jinja2 raise_exception and malformed messages
            raise RequestError(f"the chat template rejected the messages: {error}", 400) from error
        prompt_ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        if prefix:
            encoded = self.tokenizer.encode(prefix)
            if encoded and encoded[0] == self.tokenizer.bos_token_id:
                encoded = encoded[1:]
            prompt_ids += encoded
        return prompt_ids

    # -- logprobs ------------------------------------------------------------------------

    def chat_logprobs(self, event: FinishEvent | TokenEvent, ids: list[int], start: int) -> dict[str, Any] | None:
        if event.logprobs is None:
            return None
        content = []
        for offset, token_id in enumerate(ids):
            position = start + offset
            token = self.token_text(token_id)
            top = []
            if event.top_ids and position < len(event.top_ids):
                for top_id, value in zip(event.top_ids[position], event.top_values[position]):
                    text = self.token_text(top_id)
                    top.append({"token": text, "bytes": list(text.encode()), "logprob": value})
            content.append(
                {"token": token, "bytes": list(token.encode()), "logprob": event.logprobs[position], "top_logprobs": top}
            )
        return {"content": content}


def openai_error(message: str, status: int) -> dict[str, Any]:
    names = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
    return {"object": "error", "message": message, "type": names.get(status, "Error"), "param": None, "code": status}


class _Handler(BaseHTTPRequestHandler):
    server: EngineHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- plumbing ------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str) -> None:
        log.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._send_json(status, openai_error(message, status))

    def _read_json(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            self._send_error(400, f"the request body is not valid JSON: {error}")
            return None
        if not isinstance(body, dict):
            self._send_error(400, "the request body must be a JSON object")
            return None
        return body

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _sse(self, payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    # -- routes --------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        api = self.server.api
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, {})
        elif path == "/health_generate":
            healthy, message = run_health_generation(api.scheduler)
            if healthy:
                self._send_json(200, {})
            else:
                self._send_error(503, message)
        elif path in ("/get_model_info", "/model_info"):
            self._send_json(200, api.model_info())
        elif path in ("/get_server_info", "/server_info"):
            self._send_json(200, api.server_info())
        elif path == "/v1/models":
            self._send_json(200, api.models())
        elif path == "/get_load":
            self._send_json(200, [api.load()])
        else:
            self._send_error(404, f"no route for GET {path}")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        routes = {"/generate": self._generate, "/v1/chat/completions": self._chat, "/abort_request": self._abort}
        handler = routes.get(path)
        if handler is None:
            self._send_error(404, f"no route for POST {path}")
            return
        body = self._read_json()
        if body is None:
            return
        log.debug("POST %s body %s", path, json.dumps(body))
        try:
            handler(body)
        except RequestError as error:
            self._send_error(error.status, str(error))
        except (ValueError, TypeError, KeyError) as error:
            self._send_error(400, f"invalid request field: {error}")
        except (BrokenPipeError, ConnectionResetError):
            log.info("%s %s: the client closed the connection", self.command, path)

    def _abort(self, body: dict[str, Any]) -> None:
        found = self.server.api.scheduler.abort(str(body.get("rid", "")))
        self._send_json(200, {"success": found})

    def _run(self, data: GenerateInput):
        """Submit a request and yield its events; abort it when the client goes away."""
        scheduler = self.server.api.scheduler
        handle = scheduler.submit(data)
        try:
            for event in scheduler.events(handle):
                if isinstance(event, RequestError):
                    raise event
                yield event
        finally:
            scheduler.abort(data.request_id)

    # -- /generate -----------------------------------------------------------------------

    def _generate(self, body: dict[str, Any]) -> None:
        api = self.server.api
        if "input_ids" in body and body["input_ids"] is not None:
            input_ids = [int(i) for i in body["input_ids"]]
        elif isinstance(body.get("text"), str):
            input_ids = api.tokenizer.encode(body["text"])
        else:
            raise RequestError("send either text (a string) or input_ids (a list of token ids)", 400)
        params = api.native_sampling(dict(body.get("sampling_params") or {}))
        data = GenerateInput(
            input_ids=input_ids,
            params=params,
            request_id=str(body.get("rid") or uuid.uuid4().hex),
            return_logprob=bool(body.get("return_logprob", False)),
            top_logprobs_num=int(body.get("top_logprobs_num") or 0),
            stream=bool(body.get("stream", False)),
        )
        if data.stream:
            self._generate_stream(data)
            return
        results = [event for event in self._run(data) if isinstance(event, FinishEvent)]
        results.sort(key=lambda e: e.index)
        payload = [self._native_result(data, event) for event in results]
        self._send_json(200, payload[0] if params.n <= 1 else payload)

    def _native_result(self, data: GenerateInput, event: FinishEvent) -> dict[str, Any]:
        api = self.server.api
        meta: dict[str, Any] = {
            "id": data.request_id if data.params.n <= 1 else f"{data.request_id}-{event.index}",
            "finish_reason": event.finish_reason,
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "cached_tokens": 0,
        }
        if data.return_logprob and event.logprobs is not None:
            meta["output_token_logprobs"] = [[lp, tid, None] for lp, tid in zip(event.logprobs, event.output_ids)]
            if data.top_logprobs_num:
                meta["output_top_logprobs"] = [
                    [[v, i, None] for v, i in zip(values, ids)]
                    for values, ids in zip(event.top_values or [], event.top_ids or [])
                ]
        return {
            "text": api.output_text(event.output_ids, event.finish_reason, data.params),
            "output_ids": event.output_ids,
            "meta_info": meta,
            "index": event.index,
        }

    def _generate_stream(self, data: GenerateInput) -> None:
        api = self.server.api
        events = self._run(data)
        first = next(events)  # raises RequestError before any byte is sent
        self._start_sse()
        ids: dict[int, list[int]] = {}
        for event in _chain(first, events):
            if isinstance(event, TokenEvent):
                ids.setdefault(event.index, []).extend(event.token_ids)
                text = api.tokenizer.decode(ids[event.index], skip_special_tokens=data.params.skip_special_tokens)
                self._sse(
                    {
                        "text": text,
                        "output_ids": list(ids[event.index]),
                        "meta_info": {
                            "id": data.request_id,
                            "finish_reason": None,
                            "prompt_tokens": event.prompt_tokens,
                            "completion_tokens": event.completion_tokens,
                        },
                        "index": event.index,
                    }
                )
            else:
                self._sse(self._native_result(data, event))
        self._sse("[DONE]")

    # -- /v1/chat/completions ------------------------------------------------------------

    def _chat(self, body: dict[str, Any]) -> None:
        api = self.server.api
        api.check_model(body)
        prompt_ids = api.render_chat(body)
        params = api.chat_sampling(body)
        want_logprobs = bool(body.get("logprobs", False))
        data = GenerateInput(
            input_ids=prompt_ids,
            params=params,
            request_id=str(body.get("rid") or f"chatcmpl-{uuid.uuid4().hex}"),
            return_logprob=want_logprobs,
            top_logprobs_num=int(body.get("top_logprobs") or 0) if want_logprobs else 0,
            stream=bool(body.get("stream", False)),
        )
        model = body.get("model") or api.metadata.served_model_name
        if data.stream:
            self._chat_stream(data, model, body)
            return

        results = sorted((e for e in self._run(data) if isinstance(e, FinishEvent)), key=lambda e: e.index)
        choices = []
        for event in results:
            reason = event.finish_reason
            choices.append(
                {
                    "index": event.index,
                    "message": {
                        "role": "assistant",
                        "content": api.output_text(event.output_ids, reason, params),
                        "reasoning_content": None,
                        "tool_calls": None,
                    },
                    "logprobs": api.chat_logprobs(event, event.output_ids, 0) if want_logprobs else None,
                    "finish_reason": reason["type"],
                    "matched_stop": reason.get("matched"),
                }
            )

        prompt_tokens = results[0].prompt_tokens if results else len(prompt_ids)
        completion_tokens = sum(e.completion_tokens for e in results)
        self._send_json(
            200,
            {
                "id": data.request_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                    "prompt_tokens_details": None,
                },
            },
        )

    def _chat_stream(self, data: GenerateInput, model: str, body: dict[str, Any]) -> None:
        api = self.server.api
        params = data.params
        events = self._run(data)
        first = next(events)
        self._start_sse()
        created = int(time.time())

        def chunk(index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, "matched_stop": None}
            choice.update(extra)
            return {"id": data.request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}

        for index in range(max(params.n, 1)):
            self._sse(chunk(index, {"role": "assistant", "content": ""}))
        ids: dict[int, list[int]] = {}
        sent_text: dict[int, str] = {}
        prompt_tokens = len(data.input_ids)
        completion_tokens: dict[int, int] = {}
        for event in _chain(first, events):
            index = event.index
            previous = ids.setdefault(index, [])
            start = len(previous)
            if isinstance(event, TokenEvent):
                new_ids = event.token_ids
                previous.extend(new_ids)
                text = api.tokenizer.decode(previous, skip_special_tokens=params.skip_special_tokens)
                if text.endswith("\ufffd"):
                    continue  # wait for the rest of a multi-byte character
                delta = text[len(sent_text.get(index, "")) :]
                sent_text[index] = text
                logprobs = api.chat_logprobs(event, new_ids, 0) if data.return_logprob else None
                if delta or logprobs:
                    self._sse(chunk(index, {"content": delta}, logprobs=logprobs))
                continue
            completion_tokens[index] = event.completion_tokens
            text = api.output_text(event.output_ids, event.finish_reason, params)
            delta = text[len(sent_text.get(index, "")) :] if text.startswith(sent_text.get(index, "")) else ""
            logprobs = None
            if data.return_logprob:
                logprobs = api.chat_logprobs(event, event.output_ids[start:], start)
            if delta or logprobs:
                self._sse(chunk(index, {"content": delta}, logprobs=logprobs))
            self._sse(
                chunk(
                    index,
                    {},
                    finish_reason=event.finish_reason["type"],
                    matched_stop=event.finish_reason.get("matched"),
                )
            )
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            total_completion = sum(completion_tokens.values())
            self._sse(
                {
                    "id": data.request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": total_completion,
                        "total_tokens": prompt_tokens + total_completion,
                    },
                }
            )
        self._sse("[DONE]")


def _chain(first: Any, rest: Any):
    yield first
    yield from rest


def start_http_server(api: HttpApi, host: str, port: int) -> tuple[EngineHTTPServer, threading.Thread]:
    """Start the HTTP listener in a thread; raise OSError when the port cannot be bound."""
    try:
        server = EngineHTTPServer((host, port), api)
    except OSError as error:
        raise OSError(f"cannot bind the HTTP listener to {host}:{port} ({error.strerror}); choose a free --http-port") from error
    thread = threading.Thread(target=server.serve_forever, name="engine-http", daemon=True)
    thread.start()
    return server, thread
