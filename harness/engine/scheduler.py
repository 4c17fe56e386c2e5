"""The request queue: one worker thread owns the model and steps every running sequence in turn.

Requests are not batched into one matrix product, because on this CPU a product with more
than one row ran slower per row than separate products. Instead each loop admits new
requests (one prefill each), then advances every running sequence by one token, so
concurrent requests progress together and none is starved. Each sequence owns its KV
cache and sampler, so requests never share state.

Finish rules follow sglang 0.5.7's ``Req.check_finished`` (``srt/managers/schedule_batch.py``).
max_new_tokens is checked first. Stop token ids come next: the request's ids, the model's
EOS ids and the tokenizer's EOS id, all skipped with ignore_eos. Stop strings come last. A stop string is searched in the decoded
tail of the output, the last ``stop_str_max_len + 2`` tokens decoded with the tokenizer,
exactly as sglang's scheduler does it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from harness.engine.model import GemmaModel, ModelMetadata, sequence_capacity
from harness.engine.sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request cannot be served; ``status`` is the HTTP status code sglang would return."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class GenerateInput:
    """One generation request, already tokenized."""

    input_ids: list[int]
    params: SamplingConfig
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass
class TokenEvent:
    """New tokens of one sample (``index`` when n > 1)."""

    index: int
    token_ids: list[int]
    logprobs: list[float] | None
    top_values: list[list[float]] | None
    top_ids: list[list[int]] | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class FinishEvent:
    """End of one sample, with sglang's finish_reason dict (``{"type": ..., "matched": ...}``)."""

    index: int
    output_ids: list[int]
    finish_reason: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None = None
    top_values: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None
    # How many of output_ids earlier TokenEvents carried; a stream sends only the rest.
    streamed_count: int = 0


class _Sequence:
    def __init__(self, request: "_Request", index: int, sampler: Sampler):
        self.request = request
        self.index = index
        self.sampler = sampler
        self.cache = None
        self.logits = None
        self.output_ids: list[int] = []
        self.streamed_count = 0
        self.logprobs: list[float] = []
        self.top_values: list[list[float]] = []
        self.top_ids: list[list[int]] = []
        self.finished = False


class _Request:
    def __init__(self, data: GenerateInput):
        self.data = data
        self.events: "queue.Queue[TokenEvent | FinishEvent | RequestError]" = queue.Queue()
        self.aborted = threading.Event()
        self.sequences: list[_Sequence] = []
        # time.monotonic() at submit, at the start of prefill and at its end. The finish log
        # line reports queue, prefill and decode time from them, and benchmarks/diagnosis.py
        # reads that line.
        self.submitted_at = time.monotonic()
        self.prefill_started_at: float | None = None
        self.prefill_ended_at: float | None = None


class Scheduler:
    """Serve GenerateInput requests on one model from a background thread."""

    def __init__(self, model: GemmaModel, metadata: ModelMetadata, tokenizer: Any):
        self.model = model
        self.metadata = metadata
        self.tokenizer = tokenizer
        self._pending: "queue.Queue[_Request]" = queue.Queue()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)
        self.last_receive_time = 0.0
        self.stop_ids = set(metadata.eos_token_ids)
        if metadata.tokenizer_eos_token_id is not None:
            self.stop_ids.add(metadata.tokenizer_eos_token_id)

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._pending.put(None)  # type: ignore[arg-type]
        self._thread.join(timeout=10)

    @property
    def active_requests(self) -> int:
        with self._lock:
            return len(self._by_id)

    # -- client side ---------------------------------------------------------------------

    def submit(self, data: GenerateInput) -> "_Request":
        """Queue a request; raise RequestError when it cannot be served at all."""
        prompt_len = len(data.input_ids)
        if prompt_len == 0:
            raise RequestError("the input is empty: send at least one token id", 400)
        max_input = self.metadata.max_req_input_len
        if prompt_len >= max_input:
            # The message of sglang 0.5.7's validate_input_length.
            raise RequestError(
                f"Input length ({prompt_len} tokens) exceeds the maximum allowed length "
                f"({max_input} tokens). Use a shorter input or enable --allow-auto-truncate.",
                400,
            )
        bad = [i for i in data.input_ids if not 0 <= i < self.metadata.vocab_size]
        if bad:
            raise RequestError(f"input token id {bad[0]} is outside the vocabulary [0, {self.metadata.vocab_size})", 400)
        request = _Request(data)
        with self._lock:
            if data.request_id in self._by_id:
                raise RequestError(f"request id {data.request_id!r} is already running", 400)
            self._by_id[data.request_id] = request
        self.last_receive_time = time.time()
        log.info("request %s queued: %d prompt tokens, n=%d", data.request_id, prompt_len, data.params.n)
        log.debug("request %s prompt ids: %s", data.request_id, data.input_ids)
        self._pending.put(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Mark a request aborted; the worker finishes it with finish_reason abort."""
        with self._lock:
            request = self._by_id.get(request_id)
        if request is None:
            return False
        request.aborted.set()
        self._pending.put(None)  # type: ignore[arg-type]  # wakes an idle worker
        log.info("request %s abort requested", request_id)
        return True

    def events(self, request: "_Request", timeout: float | None = None):
        """Yield the request's events until every sample has finished or an error arrives."""
        remaining = max(request.data.params.n, 1)
        while remaining:
            event = request.events.get(timeout=timeout)
            yield event
            if isinstance(event, RequestError):
                return
            if isinstance(event, FinishEvent):
                remaining -= 1

    # -- worker side ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self._running
            try:
                while True:
                    request = self._pending.get(block=block, timeout=0.5 if block else None)
                    block = False
                    if request is not None:
                        self._admit(request)
            except queue.Empty:
                pass
            for sequence in list(self._running):
                if self._stop.is_set():
                    break
                try:
                    self._step(sequence)
                except Exception as error:  # one bad request must not stop the others
                    log.exception("request %s failed while decoding", sequence.request.data.request_id)
                    self._fail(sequence.request, RequestError(f"generation failed: {error}", 500))

    def _admit(self, request: "_Request") -> None:
        data = request.data
        if request.aborted.is_set():
            self._finish_all(request, {"type": "abort", "message": "Abort before prefill"})
            return
        params = data.params
        count = max(params.n, 1)
        request.prefill_started_at = time.monotonic()
        try:
            capacity = sequence_capacity(len(data.input_ids), params.max_new_tokens, self.metadata.max_context_length)
            cache = self.model.new_cache(capacity)
            logits = self.model.forward(data.input_ids, cache) if params.max_new_tokens != 0 else None
            request.prefill_ended_at = time.monotonic()
        except Exception as error:
            log.exception("request %s failed in prefill", data.request_id)
            self._fail(request, RequestError(f"prefill failed: {error}", 500))
            return
        min_tokens_stop_ids = set(params.stop_token_ids)
        if self.metadata.tokenizer_eos_token_id is not None:
            min_tokens_stop_ids.add(self.metadata.tokenizer_eos_token_id)
        for index in range(count):
            # NOTE: with a seed and n > 1, sample i uses seed + i so the samples differ.
            seed = None if params.seed is None else params.seed + index
            sampler = Sampler(params, self.model.vocab_size, min_tokens_stop_ids, seed)
            sequence = _Sequence(request, index, sampler)
            sequence.cache = cache if index == count - 1 else cache.clone()
            sequence.logits = logits
            request.sequences.append(sequence)
            if params.max_new_tokens == 0:
                self._finish(sequence, {"type": "length", "length": 0})
            else:
                self._running.append(sequence)

    def _step(self, sequence: _Sequence) -> None:
        request = sequence.request
        data = request.data
        if request.aborted.is_set():
            self._finish(sequence, {"type": "abort", "message": "Abort in waiting queue"})
            return
        if sequence.logits is None:
            sequence.logits = self.model.forward([sequence.output_ids[-1]], sequence.cache)
        want_logprob = data.top_logprobs_num if data.return_logprob else None
        result = sequence.sampler.sample(sequence.logits, len(sequence.output_ids), want_logprob)
        sequence.logits = None
        sequence.output_ids.append(result.token_id)
        if data.return_logprob:
            sequence.logprobs.append(result.logprob if result.logprob is not None else 0.0)
            sequence.top_values.append(result.top_values)
            sequence.top_ids.append(result.top_ids)

        reason = self._check_finished(sequence, result.token_id)
        if reason is None and sequence.cache.length + 1 >= self.metadata.max_context_length:
            # The next token would not fit in the context; sglang ends such requests as length.
            reason = {"type": "length", "length": len(sequence.output_ids)}
        if reason is not None:
            self._finish(sequence, reason)
        elif data.stream and not self._tail_may_start_stop(sequence):
            request.events.put(self._token_event(sequence, len(sequence.output_ids) - sequence.streamed_count))
            sequence.streamed_count = len(sequence.output_ids)

    def _decode_tail(self, sequence: _Sequence) -> str:
        params = sequence.request.data.params
        tail_len = min(params.stop_str_max_len + 2, len(sequence.output_ids))
        return self.tokenizer.decode(sequence.output_ids[-tail_len:])

    def _tail_may_start_stop(self, sequence: _Sequence) -> bool:
        """Hold stream output while the decoded tail ends with the start of a stop string.

        Mirrors sglang's ``Req.check_match_stop_str_prefix``, so a stream never sends the
        first tokens of a stop string that the request then trims.
        """
        stops = [stop for stop in sequence.request.data.params.stop if stop]
        if not stops:
            return False
        tail = self._decode_tail(sequence)
        if not tail:
            return False
        for stop in stops:
            if stop in tail:
                return True
            for size in range(1, min(len(tail), len(stop)) + 1):
                if tail[-size:] == stop[:size]:
                    return True
        return False

    def _check_finished(self, sequence: _Sequence, token_id: int) -> dict[str, Any] | None:
        params = sequence.request.data.params
        if params.max_new_tokens is not None and len(sequence.output_ids) >= params.max_new_tokens:
            return {"type": "length", "length": params.max_new_tokens}
        if not params.ignore_eos and (token_id in params.stop_token_ids or token_id in self.stop_ids):
            return {"type": "stop", "matched": token_id}
        if token_id >= self.metadata.vocab_size or token_id < 0:
            return {"type": "stop", "matched": "NaN happened"}
        if params.stop:
            tail = self._decode_tail(sequence)
            for stop in params.stop:
                if stop and stop in tail:
                    return {"type": "stop", "matched": stop}
        return None

    def _token_event(self, sequence: _Sequence, count: int) -> TokenEvent:
        data = sequence.request.data
        return TokenEvent(
            index=sequence.index,
            token_ids=sequence.output_ids[-count:] if count else [],
            logprobs=sequence.logprobs[-count:] if data.return_logprob and count else None,
            top_values=sequence.top_values[-count:] if data.return_logprob and count else None,
            top_ids=sequence.top_ids[-count:] if data.return_logprob and count else None,
            prompt_tokens=len(data.input_ids),
            completion_tokens=len(sequence.output_ids),
        )

    def _finish(self, sequence: _Sequence, reason: dict[str, Any]) -> None:
        sequence.finished = True
        if sequence in self._running:
            self._running.remove(sequence)
        request = sequence.request
        data = request.data
        request.events.put(
            FinishEvent(
                index=sequence.index,
                output_ids=list(sequence.output_ids),
                finish_reason=reason,
                prompt_tokens=len(data.input_ids),
                completion_tokens=len(sequence.output_ids),
                logprobs=list(sequence.logprobs) if data.return_logprob else None,
                top_values=list(sequence.top_values) if data.return_logprob else None,
                top_ids=list(sequence.top_ids) if data.return_logprob else None,
                streamed_count=sequence.streamed_count,
            )
        )
        now = time.monotonic()
        prefill_start = request.prefill_started_at or now
        prefill_end = request.prefill_ended_at or prefill_start
        log.info(
            "request %s sample %d finished: %s after %d tokens (queued %.3f s, prefill %.3f s, decode %.3f s)",
            data.request_id,
            sequence.index,
            reason,
            len(sequence.output_ids),
            prefill_start - request.submitted_at,
            prefill_end - prefill_start,
            now - prefill_end,
        )
        sequence.cache = None
        if all(s.finished for s in request.sequences) and len(request.sequences) == max(data.params.n, 1):
            with self._lock:
                self._by_id.pop(data.request_id, None)

    def _finish_all(self, request: "_Request", reason: dict[str, Any]) -> None:
        for index in range(max(request.data.params.n, 1)):
            sequence = _Sequence(request, index, sampler=None)  # type: ignore[arg-type]
            request.sequences.append(sequence)
            self._finish(sequence, reason)

    def _fail(self, request: "_Request", error: RequestError) -> None:
        for sequence in request.sequences:
            sequence.finished = True
            if sequence in self._running:
                self._running.remove(sequence)
        with self._lock:
            self._by_id.pop(request.data.request_id, None)
        request.events.put(error)
