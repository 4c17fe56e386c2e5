"""Replay one case on a started stack and return a capture per mode.

This is the step between stacks and captures: it sends the case's chat request to the
router of each mode exactly as the case writes it, collects what came back and, for the
gRPC mode, what the tap saw on the wire. It draws no conclusions; the diff does.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import requests

from harness.capture import (
    Capture,
    attach_wire,
    capture_chat_response,
    capture_chat_stream,
    capture_generate_response,
    retokenize_outputs,
)
from harness.cases import Case
from harness.reference import Reference
from harness.stacks.base import Stack, StackError

log = logging.getLogger(__name__)

# Upper bound for one request; a 512-token CPU decode takes about a minute.
REQUEST_TIMEOUT_S = 600.0

# After a failed request, how long to watch for a component exit that caused it. A process
# killed with SIGKILL closes its sockets before its parent can reap it (tearing down the
# engine's 1 GB of weights takes a moment), so the router can report the failure first.
DEATH_SETTLE_S = 3.0


def replay_case(case: Case, stack: Stack, reference: Reference, tokenizer: Any) -> dict[str, Capture]:
    """Send the case through every mode it lists and return the captures by mode.

    When a component of the stack has exited after a mode's request, that capture's error
    names the component, its exit code and log tail, and the remaining modes are not sent:
    their captures carry the same error.
    """
    captures: dict[str, Capture] = {}
    endpoints = stack.endpoints
    request = case.chat_request()

    for mode in case.modes:
        log.info("case %s: replaying in %s mode", case.id, mode)
        if mode == "http":
            capture = post_chat(case.id, "http", endpoints.http_router, request)
            capture.worker_metadata = fetch_worker(endpoints.http_router)
            retokenize_outputs(capture, tokenizer)
        elif mode == "grpc":
            mark = stack.wire_mark()
            capture = post_chat(case.id, "grpc", endpoints.grpc_router, request)
            attach_wire(capture, stack.wire_records_since(mark))
            capture.worker_metadata = fetch_worker(endpoints.grpc_router)
        elif mode == "direct":
            if endpoints.server_http is None:
                log.warning("case %s: the stack has no server HTTP API, direct mode skipped", case.id)
                continue
            capture = post_generate(case, endpoints.server_http, reference.prompt_ids)
        else:
            raise ValueError(f"case {case.id}: unknown mode {mode!r}")
        log.info(
            "case %s: %s mode responded in %.1f s (%s)",
            case.id,
            mode,
            capture.elapsed_s,
            capture.error or f"{sum(len(c.output_ids or []) for c in capture.choices)} output ids",
        )
        captures[mode] = capture
        death = _stack_death(stack, settle_s=DEATH_SETTLE_S if capture.error else 0.0)
        if death is not None:
            # A stream cut short by a dying router can look complete, so the capture counts
            # as failed whether or not the request itself reported an error.
            capture.error = death if capture.error is None else f"{death}\n(the request failed with: {capture.error})"
            log.error("case %s: %s", case.id, death.splitlines()[0])
            remaining = [m for m in case.modes if m not in captures]
            captures.update(failed_captures(case, death, remaining))
            break
    return captures


def _stack_death(stack: Stack, settle_s: float = 0.0) -> str | None:
    """Return the message of a component that exited, polling up to ``settle_s`` for one."""
    deadline = time.monotonic() + settle_s
    while True:
        try:
            stack.check_alive()
        except StackError as error:
            return str(error)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def failed_captures(case: Case, reason: str, modes: list[str] | None = None) -> dict[str, Capture]:
    """Return a capture per mode that was not sent because the stack stopped working."""
    request = case.chat_request()
    return {
        mode: Capture(case_id=case.id, mode=mode, request=request, error=f"not sent: {reason}")
        for mode in (case.modes if modes is None else modes)
    }


def post_chat(case_id: str, mode: str, base_url: str, request: dict[str, Any]) -> Capture:
    """POST a chat completion to a router and capture the response, streamed or not."""
    url = f"{base_url}/v1/chat/completions"
    started = time.monotonic()
    try:
        response = requests.post(url, json=request, stream=bool(request.get("stream")), timeout=REQUEST_TIMEOUT_S)
        if request.get("stream") and response.status_code == 200:
            events = list(_read_sse(response))
            return capture_chat_stream(case_id, mode, request, response.status_code, events, time.monotonic() - started)
        body = _json_or_text(response)
        return capture_chat_response(case_id, mode, request, response.status_code, body, time.monotonic() - started)
    except requests.RequestException as error:
        return Capture(
            case_id=case_id,
            mode=mode,
            request=request,
            error=f"request to {url} failed: {error}",
            elapsed_s=time.monotonic() - started,
        )


# Case sampling keys (the OpenAI API's names) and their names in sglang's native sampling_params.
NATIVE_SAMPLING_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "max_new_tokens",
    "seed": "sampling_seed",
}


def generate_request(case: Case, prompt_ids: list[int]) -> dict[str, Any]:
    """Translate a case into sglang's native ``/generate`` body for the given prompt ids."""
    sampling = case.sampling
    params: dict[str, Any] = {}
    for case_name, native_name in NATIVE_SAMPLING_NAMES.items():
        value = getattr(sampling, case_name)
        if value is not None:
            params[native_name] = value
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.n != 1:
        params["n"] = sampling.n
    if sampling.ignore_eos:
        params["ignore_eos"] = True
    body: dict[str, Any] = {"input_ids": list(prompt_ids), "sampling_params": params, "stream": False}
    if sampling.logprobs:
        body["return_logprob"] = True
        body["top_logprobs_num"] = sampling.top_logprobs or 0
        body["logprob_start_len"] = -1
    return body


def post_generate(case: Case, server_url: str, prompt_ids: list[int]) -> Capture:
    """Ask the server itself, bypassing every router, to continue the reference prompt ids."""
    body = generate_request(case, prompt_ids)
    url = f"{server_url}/generate"
    started = time.monotonic()
    try:
        response = requests.post(url, json=body, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as error:
        return Capture(
            case_id=case.id,
            mode="direct",
            request=body,
            error=f"request to {url} failed: {error}",
            elapsed_s=time.monotonic() - started,
        )
    return capture_generate_response(
        case.id, body, prompt_ids, response.status_code, _json_or_text(response), time.monotonic() - started
    )


def fetch_worker(router_url: str) -> dict[str, Any] | None:
    """Return the router's entry for its (single) worker from ``GET /workers``, or None."""
    try:
        response = requests.get(f"{router_url}/workers", timeout=10)
        body = response.json()
    except (requests.RequestException, ValueError) as error:
        log.warning("could not read %s/workers: %s", router_url, error)
        return None
    workers = body.get("workers") if isinstance(body, dict) else body
    if isinstance(workers, list) and workers:
        return workers[0]
    return None


def _read_sse(response: requests.Response):
    """Yield the decoded JSON of each ``data:`` line until ``[DONE]``; keep undecodable lines as text."""
    for raw_line in response.iter_lines(decode_unicode=True):
        if not raw_line or not raw_line.startswith("data:"):
            continue
        payload = raw_line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        try:
            yield json.loads(payload)
        except ValueError:
            yield {"error": {"message": f"undecodable stream line: {payload[:200]}"}}


def _json_or_text(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text
