"""The diff: compare each mode's capture with the reference and with the other modes.

``compare`` is the one comparison contract. It returns findings ordered root cause first:
failed requests, then prompt ids, worker metadata and the parameters on the wire, then stop
sets, then the output streams. Every finding carries the expected and observed ids with
their decoded text, and token findings carry a window of aligned tokens around the
divergence (``evidence["tokens"]``) that the report renders as a side-by-side table.

What is compared depends on how the case samples. Greedy or seeded cases are compared on
every token. Cases sampled without a seed are compared only on what sampling cannot change:
prompt ids, stop sets, parameters on the wire, usage consistency and finish semantics (a
stop at output position 0 on one side only). Output ids that only exist as re-encoded text
(``retokenized``) are weaker evidence than ids seen on the wire or returned by the engine,
so token comparisons built on them state it in their explanation.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from harness.capture import Capture, TokenLogprob, WireRecord
from harness.cases import Case
from harness.findings import Finding, Kind, Layer, Severity
from harness.reference import Reference

# Tokens of context shown before and after a divergence.
CONTEXT_TOKENS = 3
# Id sources that were observed, as opposed to derived from text.
OBSERVED_SOURCES = ("wire", "engine")
# Tolerance for float sampling params: the wire carries float32, the request float64.
FLOAT_TOLERANCE = 1e-4

# Root cause first: a failed call explains missing data, prompt ids explain what follows.
KIND_ORDER = [
    Kind.REQUEST_FAILED,
    Kind.MISSING_BOS,
    Kind.EXTRA_BOS,
    Kind.GENERATION_PROMPT_MISSING,
    Kind.TEMPLATE_DRIFT,
    Kind.PROMPT_COUNT_MISMATCH,
    Kind.WORKER_METADATA_MISMATCH,
    Kind.SAMPLING_PARAM_MISMATCH,
    Kind.STOP_SET_MISSING,
    Kind.STOP_SET_EXTRA,
    Kind.SPURIOUS_STOP,
    Kind.STOP_STRING_ONE_SIDE,
    Kind.OUTPUT_DIVERGENCE,
    Kind.NEAR_TIE,
    Kind.FINISH_MISMATCH,
    Kind.DETOKENIZER_DRIFT,
    Kind.USAGE_MISMATCH,
]
MODE_ORDER = ("grpc", "http", "direct")
PROMPT_KINDS = {Kind.MISSING_BOS, Kind.EXTRA_BOS, Kind.GENERATION_PROMPT_MISSING, Kind.TEMPLATE_DRIFT}


class Tokenizer(Protocol):
    """The part of a transformers tokenizer the diff uses."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass
class CaseResult:
    """One case after the replay and the diff: what was sent, observed and concluded."""

    case: Case
    reference: Reference
    captures: dict[str, Capture]
    findings: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Return True when no finding has severity ``bug``."""
        return not any(f.severity == Severity.BUG for f in self.findings)

    def findings_for(self, mode: str) -> list[Finding]:
        """Return the findings on ``mode``, including those on both sides."""
        return [f for f in self.findings if f.side in (mode, "both")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": dataclasses.asdict(self.case),
            "reference": self.reference.to_dict(),
            "captures": {mode: capture.to_dict() for mode, capture in self.captures.items()},
            "findings": [f.to_dict() for f in self.findings],
            "passed": self.passed,
        }


# ---------------------------------------------------------------------------------------
# Tokens: decoded pieces and aligned windows


def token_piece(tokenizer: Tokenizer, token_id: int) -> str:
    """Decode one id with special tokens kept; ids outside the vocabulary read ``<?id>``."""
    try:
        return tokenizer.decode([token_id], skip_special_tokens=False)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return f"<?{token_id}>"


def decode_ids(tokenizer: Tokenizer, ids: Sequence[int] | None, skip_special_tokens: bool = False) -> str | None:
    if ids is None:
        return None
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
    except (IndexError, KeyError, OverflowError, TypeError, ValueError):
        return "".join(token_piece(tokenizer, i) for i in ids)


def is_special(tokenizer: Tokenizer, reference: Reference, token_id: int | None) -> bool:
    if token_id is None:
        return False
    if token_id in reference.special_tokens:
        return True
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    token = added.get(token_id)
    return bool(token is not None and getattr(token, "special", False))


def common_prefix_length(left: Sequence[Any], right: Sequence[Any]) -> int:
    length = 0
    for a, b in zip(left, right):
        if a != b:
            break
        length += 1
    return length


def align_tokens(
    tokenizer: Tokenizer,
    reference: Reference,
    expected: Sequence[int],
    observed: Sequence[int],
    focus: tuple[int | None, int | None] | None = None,
    context: int = CONTEXT_TOKENS,
    positional: bool = False,
) -> dict[str, Any]:
    """Align two id streams and return the rows around a divergence, for the report.

    Each row has the expected and observed position, id, decoded piece and whether the id
    is special, and a status: ``match``, ``changed``, ``missing`` (expected only) or
    ``extra`` (observed only). ``focus`` is an (expected, observed) position pair; without it
    the window centres on the first row that is not a match. Prompts are aligned with
    insertions and deletions (difflib). Output streams are aligned by position
    (``positional``), because tokens after a divergence are unrelated and a chance match
    there would read as agreement.
    """
    rows: list[dict[str, Any]] = []
    if positional:
        opcodes = []
        for n in range(max(len(expected), len(observed))):
            i = n if n < len(expected) else None
            j = n if n < len(observed) else None
            if i is not None and j is not None:
                status = "match" if expected[i] == observed[j] else "changed"
            else:
                status = "missing" if j is None else "extra"
            rows.append(_row(tokenizer, reference, status, i, expected, j, observed))
    else:
        matcher = difflib.SequenceMatcher(None, list(expected), list(observed), autojunk=False)
        opcodes = matcher.get_opcodes()
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            for offset in range(i2 - i1):
                rows.append(_row(tokenizer, reference, "match", i1 + offset, expected, j1 + offset, observed))
        elif tag == "replace":
            for offset in range(max(i2 - i1, j2 - j1)):
                i = i1 + offset if i1 + offset < i2 else None
                j = j1 + offset if j1 + offset < j2 else None
                if i is not None and j is not None:
                    status = "changed"
                elif j is None:
                    status = "missing"
                else:
                    status = "extra"
                rows.append(_row(tokenizer, reference, status, i, expected, j, observed))
        elif tag == "delete":
            for i in range(i1, i2):
                rows.append(_row(tokenizer, reference, "missing", i, expected, None, observed))
        else:
            for j in range(j1, j2):
                rows.append(_row(tokenizer, reference, "extra", None, expected, j, observed))

    focus_row = next((n for n, row in enumerate(rows) if row["status"] != "match"), len(rows))
    if focus is not None:
        for n, row in enumerate(rows):
            if (focus[0] is not None and row["expected_position"] == focus[0]) or (
                focus[0] is None and focus[1] is not None and row["observed_position"] == focus[1]
            ):
                focus_row = n
                break
    last_change = focus_row
    while last_change + 1 < len(rows) and rows[last_change + 1]["status"] != "match" and last_change - focus_row < 4:
        last_change += 1
    start = max(0, focus_row - context)
    end = min(len(rows), last_change + 1 + context)
    return {
        "rows": rows[start:end],
        "focus": focus_row - start,
        "truncated_before": start,
        "truncated_after": len(rows) - end,
    }


def _row(
    tokenizer: Tokenizer,
    reference: Reference,
    status: str,
    i: int | None,
    expected: Sequence[int],
    j: int | None,
    observed: Sequence[int],
) -> dict[str, Any]:
    expected_id = expected[i] if i is not None else None
    observed_id = observed[j] if j is not None else None
    return {
        "status": status,
        "expected_position": i,
        "expected_id": expected_id,
        "expected_piece": token_piece(tokenizer, expected_id) if expected_id is not None else None,
        "expected_special": is_special(tokenizer, reference, expected_id),
        "observed_position": j,
        "observed_id": observed_id,
        "observed_piece": token_piece(tokenizer, observed_id) if observed_id is not None else None,
        "observed_special": is_special(tokenizer, reference, observed_id),
    }


def _text_context(text: str, index: int, width: int = 24) -> str:
    start = max(0, index - width)
    excerpt = text[start : index + width]
    if start:
        excerpt = "…" + excerpt
    if index + width < len(text):
        excerpt += "…"
    return excerpt


def _first_text_difference(left: str, right: str) -> int:
    return common_prefix_length(left, right)


# ---------------------------------------------------------------------------------------
# What each side observed


@dataclass
class Output:
    """One choice of one side, reduced to what the comparisons need."""

    mode: str
    index: int
    ids: list[int] | None
    source: str | None
    text: str | None
    finish_reason: str | None
    matched_stop: int | str | None
    logprobs: list[TokenLogprob] | None
    # Completion tokens of this choice from the usage block, when only one choice exists.
    completion_tokens: int | None
    # The stop_token_ids this side's router put on the wire (empty without a tap).
    wire_stop_ids: set[int] = field(default_factory=set)

    @property
    def observed(self) -> bool:
        return self.ids is not None and self.source in OBSERVED_SOURCES


def wire_output_ids(capture: Capture) -> dict[int, list[int]]:
    """Return each choice's output ids as they crossed the wire, by choice index.

    A streamed call carries the ids in its chunks and only the last delta in its
    GenerateComplete (as the CPU engine streams, like sglang 0.5.7's incremental output),
    so the ids are the chunks' ids followed by the completion's.
    """
    ids: dict[int, list[int]] = {}
    for record in capture.wire:
        if record.request.stream:
            for chunk in record.chunks:
                ids.setdefault(int(chunk.get("index", 0)), []).extend(int(i) for i in chunk.get("token_ids") or [])
        for completion in record.completions:
            ids.setdefault(completion.index, []).extend(completion.output_ids)
    return ids


def outputs_of(capture: Capture, tokenizer: Tokenizer) -> list[Output]:
    """Return one Output per choice, taking ids from the wire whenever the tap saw them."""
    completions = {c.index: c for record in capture.wire for c in record.completions}
    wire_ids = wire_output_ids(capture)
    usage_completion = (capture.usage or {}).get("completion_tokens")
    single = len(capture.choices) == 1
    wire_stop_ids: set[int] = set()
    if capture.wire:
        wire_stop_ids = {int(i) for i in wire_sampling_params(capture.wire[0]).get("stop_token_ids") or []}
    outputs = []
    for choice in capture.choices:
        ids, source = choice.output_ids, choice.output_ids_source
        completion = completions.get(choice.index)
        if choice.index in wire_ids and (ids is None or source == "wire"):
            ids, source = wire_ids[choice.index], "wire"
        if ids is None and choice.text is not None:
            ids, source = tokenizer.encode(choice.text, add_special_tokens=False), "retokenized"
        logprobs = choice.logprobs
        if logprobs is None and completion is not None:
            logprobs = completion.logprobs
        outputs.append(
            Output(
                mode=capture.mode,
                index=choice.index,
                ids=list(ids) if ids is not None else None,
                source=source,
                text=choice.text,
                finish_reason=choice.finish_reason,
                matched_stop=choice.matched_stop,
                logprobs=logprobs,
                completion_tokens=usage_completion if single else None,
                wire_stop_ids=wire_stop_ids,
            )
        )
    return outputs


def wire_sampling_params(record: WireRecord) -> dict[str, Any]:
    """Return the record's sampling params with protobuf JSON names turned into field names."""
    params = {}
    for key, value in record.request.sampling_params.items():
        snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
        params[snake] = value
    return params


def stop_event(output: Output, stop_ids: set[int]) -> tuple[int, int | str] | None:
    """Return (output position, id or string) of the stop that ended the output, if any.

    The position of a stop token is its index in the observed ids (sglang keeps the stop
    token in ``output_ids``). For re-encoded text, which lacks special tokens, it is the
    usage's completion count minus one when known, else the length of the ids.
    """
    if output.finish_reason != "stop":
        return None
    matched = output.matched_stop
    ids = output.ids or []
    if matched is None and ids and ids[-1] in stop_ids and output.observed:
        matched = ids[-1]
    if matched is None:
        return None
    if isinstance(matched, str):
        return (len(ids), matched)
    if output.observed and ids and ids[-1] == matched:
        return (len(ids) - 1, matched)
    if output.completion_tokens:
        return (output.completion_tokens - 1, matched)
    return (len(ids), matched)


def generated_length(output: Output) -> int | None:
    """Return how many tokens the side generated, preferring observed ids over usage."""
    if output.observed:
        return len(output.ids or [])
    if output.completion_tokens is not None:
        return output.completion_tokens
    return len(output.ids) if output.ids is not None else None


# ---------------------------------------------------------------------------------------
# The comparison contract


@dataclass
class _Context:
    case: Case
    reference: Reference
    tokenizer: Tokenizer
    # The ids that end generation on a correct stack: the model's stop ids (unless the case
    # ignores EOS) and the request's own stop ids.
    stop_ids: set[int]
    stop_strings: list[str]
    bos_text: str | None

    def finding(self, kind: Kind, layer: Layer, side: str, explanation: str, **fields: Any) -> Finding:
        return Finding(case_id=self.case.id, kind=kind, layer=layer, side=side, explanation=explanation, **fields)

    def piece(self, token_id: int | None) -> str | None:
        return token_piece(self.tokenizer, token_id) if token_id is not None else None

    def pieces(self, ids: Iterable[int] | None) -> str | None:
        return decode_ids(self.tokenizer, list(ids), skip_special_tokens=False) if ids is not None else None

    def window(self, expected: Sequence[int], observed: Sequence[int], focus=None, positional=False) -> dict[str, Any]:
        return align_tokens(self.tokenizer, self.reference, expected, observed, focus, positional=positional)

    def stop_list(self, ids: Iterable[int]) -> str:
        return ", ".join(f"{i} {self.piece(i)!r}" for i in sorted(ids))


def compare(case: Case, reference: Reference, captures: dict[str, Capture], tokenizer: Tokenizer) -> list[Finding]:
    """Compare every mode's capture with the reference and with each other; return findings.

    ``captures`` maps a mode ("http", "grpc", "direct") to its capture. ``tokenizer`` is
    the model's transformers tokenizer, used to decode ids and re-encode text.
    """
    request_stop_ids = set(reference.request_stop_ids) | set(case.sampling.stop_token_ids)
    model_stop_ids = set() if case.sampling.ignore_eos else set(reference.stop_ids)
    bos_text = None
    if reference.bos_id is not None:
        bos_text = reference.special_tokens.get(reference.bos_id) or token_piece(tokenizer, reference.bos_id)
    context = _Context(
        case=case,
        reference=reference,
        tokenizer=tokenizer,
        stop_ids=model_stop_ids | request_stop_ids,
        stop_strings=list(reference.stop_strings or case.sampling.stop),
        bos_text=bos_text,
    )

    findings: list[Finding] = []
    outputs: dict[str, list[Output]] = {}
    for mode in sorted(captures, key=_mode_rank):
        capture = captures[mode]
        findings += check_transport(context, capture)
        findings += check_prompt(context, capture)
        findings += check_worker_metadata(context, capture)
        findings += check_wire_params(context, capture)
        if capture.error is None:
            outputs[mode] = outputs_of(capture, tokenizer)
            findings += check_stop_set(context, capture, outputs[mode])
            findings += check_finish(context, capture, outputs[mode])
            findings += check_usage(context, capture, outputs[mode])
            findings += check_detokenizer(context, capture, outputs[mode])

    findings += check_stop_strings(context, outputs)
    # The layer of each side's first prompt finding, which explains what its output does next.
    prompt_layers: dict[str, Layer] = {}
    for finding in findings:
        differs = finding.kind in PROMPT_KINDS or (
            finding.kind == Kind.PROMPT_COUNT_MISMATCH and finding.layer != Layer.RESPONSE
        )
        if differs:
            prompt_layers.setdefault(finding.side, finding.layer)
    for side, baseline in _pairs(outputs):
        findings += compare_outputs(context, outputs[side], outputs[baseline], prompt_layers.get(side))
    return order_findings(_drop_duplicates(findings))


def order_findings(findings: list[Finding]) -> list[Finding]:
    """Sort findings root cause first: by kind, then bugs before the rest, then by mode."""
    severity_rank = {Severity.BUG: 0, Severity.NEAR_TIE: 1, Severity.INFO: 2}
    return sorted(
        findings,
        key=lambda f: (
            KIND_ORDER.index(f.kind) if f.kind in KIND_ORDER else len(KIND_ORDER),
            severity_rank[f.severity],
            _mode_rank(f.side),
            f.choice_index,
            f.position if f.position is not None else -1,
            f.explanation,
        ),
    )


def _mode_rank(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def _pairs(outputs: dict[str, list[Output]]) -> list[tuple[str, str]]:
    """Return (side, baseline) pairs: each router mode against direct if present, else grpc vs http."""
    if "direct" in outputs:
        return [(mode, "direct") for mode in ("grpc", "http") if mode in outputs]
    if "grpc" in outputs and "http" in outputs:
        return [("grpc", "http")]
    return []


def _drop_duplicates(findings: list[Finding]) -> list[Finding]:
    """Drop a stop-set-extra that only restates a spurious stop on the same side and id."""
    spurious = {(f.side, f.choice_index, f.observed) for f in findings if f.kind == Kind.SPURIOUS_STOP}
    return [
        f
        for f in findings
        if not (
            f.kind == Kind.STOP_SET_EXTRA
            and f.evidence.get("from") == "observed stop"
            and (f.side, f.choice_index, f.observed) in spurious
        )
    ]


# ---------------------------------------------------------------------------------------
# Transport


def check_transport(context: _Context, capture: Capture) -> list[Finding]:
    findings = []
    if capture.error is not None:
        findings.append(
            context.finding(
                Kind.REQUEST_FAILED,
                Layer.TRANSPORT,
                capture.mode,
                f"The {capture.mode} request failed with status {capture.status}: {capture.error}; "
                "nothing after the failure can be compared for this mode.",
                observed={"status": capture.status, "error": capture.error},
                evidence={"status": capture.status, "message": capture.error},
            )
        )
    for number, record in enumerate(capture.wire):
        if record.error is None:
            continue
        findings.append(
            context.finding(
                Kind.REQUEST_FAILED,
                Layer.TRANSPORT,
                capture.mode,
                f"Generate call {number} ({record.request.request_id}) failed on the wire with gRPC status "
                f"{record.status_code}: {record.error}.",
                observed={"status": record.status_code, "error": record.error},
                evidence={"status": record.status_code, "message": record.error, "wire_call": number},
            )
        )
    return findings


# ---------------------------------------------------------------------------------------
# Prompt ids


def check_prompt(context: _Context, capture: Capture) -> list[Finding]:
    """Compare observed prompt ids (or, without ids, the usage count) with the reference."""
    reference = context.reference
    if capture.prompt_ids is None:
        return _check_prompt_count(context, capture)

    expected = list(reference.prompt_ids)
    observed = list(capture.prompt_ids)
    if observed == expected:
        return []

    # smg 1.13.0 sends an empty original_text, which carries no rendered text to compare.
    original_text = (capture.wire[0].request.original_text or None) if capture.wire else None
    source = capture.prompt_ids_source or "unknown"
    base = {"stream": "prompt", "evidence": {"prompt_ids_source": source}}
    findings: list[Finding] = []

    # Normalize the start: a missing or doubled <bos> is one finding, and the rest of the
    # prompt is then compared without it.
    bos = reference.bos_id
    body_expected, body_observed = expected, observed
    # Where the bodies start inside the full streams, to report positions in full-stream terms.
    expected_offset = observed_offset = 0
    if bos is not None and expected[:1] == [bos] and observed[:1] != [bos]:
        findings.append(_missing_bos(context, capture, expected, observed, original_text, base))
        body_expected, expected_offset = expected[1:], 1
    elif bos is not None and observed[:1] == [bos] and (expected[:1] != [bos] or observed[1:2] == [bos]):
        findings.append(_extra_bos(context, capture, expected, observed, original_text, base))
        body_observed, observed_offset = observed[1:], 1

    generation_prompt = list(reference.generation_prompt_ids)
    if (
        generation_prompt
        and body_expected[-len(generation_prompt) :] == generation_prompt
        and body_observed[-len(generation_prompt) :] != generation_prompt
    ):
        findings.append(_missing_generation_prompt(context, capture, expected, observed, original_text, base))
        body_expected = body_expected[: -len(generation_prompt)]
        trimmed = body_observed
        # A partial generation prompt (e.g. "<start_of_turn>" without "model\n") is part of
        # the same finding, so drop whatever prefix of it the observed ids end with.
        for cut in range(len(generation_prompt) - 1, 0, -1):
            if body_observed[-cut:] == generation_prompt[:cut]:
                trimmed = body_observed[:-cut]
                break
        body_observed = trimmed

    if body_expected != body_observed:
        findings.append(
            _template_drift(
                context, capture, expected, observed, body_expected, body_observed,
                expected_offset, observed_offset, original_text, base,
            )
        )
    return findings


def _missing_bos(context, capture, expected, observed, original_text, base) -> Finding:
    bos, bos_text = context.reference.bos_id, context.bos_text
    if original_text is None:
        layer = Layer.CHAT_TEMPLATE
        cause = (
            "the wire carries no original_text, so it cannot tell whether the template rendered "
            f"bos_token empty or the tokenizer dropped {bos_text}"
        )
    elif bos_text and original_text.startswith(bos_text):
        layer = Layer.TOKENIZER
        cause = f"the rendered text starts with {bos_text}, so the tokenizer did not map it to id {bos}"
    else:
        layer = Layer.CHAT_TEMPLATE
        cause = (
            f"the rendered text does not start with {bos_text}, so the template rendered bos_token "
            "as an empty string and the tokenizer did not add it either"
        )
    return context.finding(
        Kind.MISSING_BOS,
        layer,
        capture.mode,
        f"The {capture.mode} prompt ids lack {bos_text} ({bos}) at position 0 "
        f"({len(observed)} ids instead of {len(expected)}); {cause}.",
        position=0,
        expected=[bos],
        observed=observed[:1],
        expected_text=bos_text,
        observed_text=context.pieces(observed[:1]),
        **_with_evidence(base, tokens=context.window(expected, observed, (0, None)),
                         original_text_start=(original_text or "")[:40]),
    )


def _extra_bos(context, capture, expected, observed, original_text, base) -> Finding:
    bos, bos_text = context.reference.bos_id, context.bos_text
    doubled = observed[1:2] == [bos]
    if doubled and original_text and bos_text and original_text.startswith(bos_text):
        layer = Layer.TOKENIZER
        cause = f"the rendered text already starts with {bos_text} and the tokenizer added another"
    elif doubled:
        layer = Layer.CHAT_TEMPLATE
        cause = f"the template wrote {bos_text} twice"
    else:
        layer = Layer.TOKENIZER
        cause = "the reference prompt has no BOS, so the tokenizer added one the template did not write"
    position = 1 if doubled else 0
    return context.finding(
        Kind.EXTRA_BOS,
        layer,
        capture.mode,
        f"The {capture.mode} prompt ids carry an extra {bos_text} ({bos}) at position {position}; {cause}.",
        position=position,
        expected=expected[position : position + 1],
        observed=[bos],
        expected_text=context.pieces(expected[position : position + 1]),
        observed_text=bos_text,
        **_with_evidence(base, tokens=context.window(expected, observed, (None, position))),
    )


def _missing_generation_prompt(context, capture, expected, observed, original_text, base) -> Finding:
    generation_prompt = list(context.reference.generation_prompt_ids)
    generation_text = context.pieces(generation_prompt) or ""
    if original_text and original_text.endswith(generation_text):
        layer = Layer.TOKENIZER
        cause = f"the rendered text ends with {generation_text!r}, so the tokenizer lost it"
    else:
        layer = Layer.CHAT_TEMPLATE
        cause = "the template was rendered without add_generation_prompt"
    position = len(expected) - len(generation_prompt)
    return context.finding(
        Kind.GENERATION_PROMPT_MISSING,
        layer,
        capture.mode,
        f"The {capture.mode} prompt ids do not end with the generation prompt {generation_text!r}; {cause}.",
        position=position,
        expected=generation_prompt,
        observed=observed[-len(generation_prompt) :],
        expected_text=generation_text,
        observed_text=context.pieces(observed[-len(generation_prompt) :]),
        **_with_evidence(base, tokens=context.window(expected, observed, (position, None))),
    )


def _template_drift(
    context, capture, expected, observed, body_expected, body_observed,
    offset_expected, offset_observed, original_text, base,
) -> Finding:
    prefix = common_prefix_length(body_expected, body_observed)
    position = prefix + offset_expected
    observed_position = prefix + offset_observed
    expected_id = body_expected[prefix] if prefix < len(body_expected) else None
    observed_id = body_observed[prefix] if prefix < len(body_observed) else None
    reference_text = context.reference.prompt_text
    if capture.mode == "direct":
        layer = Layer.TRANSPORT
        cause = "the direct mode sends the reference ids, so the server received other ids than were sent"
        text_context = None
    elif original_text is None:
        layer = Layer.CHAT_TEMPLATE
        cause = "no rendered text was observed, so the template is the first suspect"
        text_context = None
    elif original_text == reference_text:
        layer = Layer.TOKENIZER
        cause = "the rendered text equals the reference text, so the tokenizer encoded it differently"
        text_context = None
    else:
        index = _first_text_difference(reference_text, original_text)
        layer = Layer.CHAT_TEMPLATE
        cause = (
            f"the rendered text differs from the reference at character {index} "
            f"(expected {_text_context(reference_text, index)!r}, observed {_text_context(original_text, index)!r})"
        )
        text_context = {"character": index, "expected": _text_context(reference_text, index),
                        "observed": _text_context(original_text, index)}
    return context.finding(
        Kind.TEMPLATE_DRIFT,
        layer,
        capture.mode,
        f"The {capture.mode} prompt ids differ from the reference at position {position} "
        f"(expected {expected_id} {context.piece(expected_id)!r}, observed {observed_id} "
        f"{context.piece(observed_id)!r}) after {prefix} matching ids; {cause}.",
        position=position,
        expected=body_expected[prefix : prefix + 1],
        observed=body_observed[prefix : prefix + 1],
        expected_text=context.piece(expected_id),
        observed_text=context.piece(observed_id),
        **_with_evidence(
            base,
            tokens=context.window(expected, observed, (position if expected_id is not None else None, observed_position)),
            matched_prefix=prefix,
            text_difference=text_context,
        ),
    )


def _check_prompt_count(context: _Context, capture: Capture) -> list[Finding]:
    """Compare the usage prompt count with the reference when no prompt ids were observed."""
    prompt_tokens = (capture.usage or {}).get("prompt_tokens")
    expected = len(context.reference.prompt_ids)
    if capture.error is not None or prompt_tokens is None or prompt_tokens == expected:
        return []
    delta = prompt_tokens - expected
    reference = context.reference
    generation_length = len(reference.generation_prompt_ids)
    if delta == -1 and reference.bos_id is not None and reference.prompt_ids[:1] == [reference.bos_id]:
        layer, cause = Layer.CHAT_TEMPLATE, f"one id short, which matches a missing {context.bos_text}"
    elif delta == 1 and reference.bos_id is not None:
        layer, cause = Layer.TOKENIZER, f"one id more, which matches a second {context.bos_text} added by the tokenizer"
    elif generation_length and delta == -generation_length:
        layer, cause = Layer.CHAT_TEMPLATE, "short by exactly the generation prompt"
    else:
        layer, cause = Layer.CHAT_TEMPLATE, "no ids were observed, so template and tokenizer cannot be told apart"
    return [
        context.finding(
            Kind.PROMPT_COUNT_MISMATCH,
            layer,
            capture.mode,
            f"The {capture.mode} usage reports {prompt_tokens} prompt tokens but the reference prompt has "
            f"{expected} ({delta:+d}); {cause}.",
            stream="prompt",
            expected=expected,
            observed=prompt_tokens,
            evidence={"prompt_ids_source": None, "usage": capture.usage},
        )
    ]


def _with_evidence(base: dict[str, Any], **evidence: Any) -> dict[str, Any]:
    merged = dict(base)
    merged["evidence"] = {**base.get("evidence", {}), **{k: v for k, v in evidence.items() if v is not None}}
    return merged


# ---------------------------------------------------------------------------------------
# Worker metadata

def _parse_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _parse_list(value: Any) -> list[Any] | None:
    """Read a list given as a list, a JSON string ("[1,106]") or a comma-separated string."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = [part.strip() for part in value.split(",") if part.strip()]
        return parsed if isinstance(parsed, list) else [parsed]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    return None


def _parse_int_list(value: Any) -> list[int] | None:
    items = _parse_list(value)
    if items is None:
        return None
    numbers = [_parse_int(item) for item in items]
    return None if any(n is None for n in numbers) else sorted(numbers)


def _parse_name(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _parse_names(value: Any) -> list[str] | None:
    items = _parse_list(value)
    return [str(item) for item in items] if items else None


@dataclass(frozen=True)
class MetadataField:
    """One model fact in a router's worker entry: where to look and how to read it."""

    name: str
    # Reference attribute holding the model's value.
    attribute: str
    # Keys to look for, best first. smg 1.13.0 lists capabilities under models[].model_type,
    # so the HF model type is read from hf_model_type before model_type.
    keys: tuple[str, ...]
    parse: Any


# Both sglang-router 0.3.2 (under "metadata") and smg 1.13.0 (under "labels") report these
# as strings, e.g. "eos_token_ids": "[1,106]"; smg also nests a "models" list.
METADATA_FIELDS = (
    MetadataField("vocab_size", "vocab_size", ("vocab_size",), _parse_int),
    MetadataField("bos_token_id", "bos_id", ("bos_token_id",), _parse_int),
    MetadataField("eos_token_ids", "eos_ids", ("eos_token_ids", "eos_token_id"), _parse_int_list),
    MetadataField("model_type", "model_type", ("hf_model_type", "model_type"), _parse_name),
    MetadataField("architectures", "architectures", ("architectures",), _parse_names),
    MetadataField(
        "max_context_length", "max_context_length", ("max_context_length", "context_length", "max_model_len"), _parse_int
    ),
)


def find_metadata_value(metadata: Any, keys: Sequence[str], parse: Any = None) -> Any:
    """Return the first readable value under one of ``keys`` at any depth of ``metadata``.

    Keys are tried in order at each level before descending. ``parse`` turns a raw value
    into the expected type or None, and a None result keeps the search going.
    """
    if isinstance(metadata, dict):
        for key in keys:
            if key in metadata and metadata[key] not in (None, "", []):
                value = parse(metadata[key]) if parse else metadata[key]
                if value is not None:
                    return value
        for value in metadata.values():
            found = find_metadata_value(value, keys, parse)
            if found is not None:
                return found
    elif isinstance(metadata, list):
        for value in metadata:
            found = find_metadata_value(value, keys, parse)
            if found is not None:
                return found
    return None


def check_worker_metadata(context: _Context, capture: Capture) -> list[Finding]:
    """Compare the model facts in the router's worker entry with the model's config files."""
    metadata = capture.worker_metadata
    if not metadata:
        return []
    findings = []
    for spec in METADATA_FIELDS:
        expected = getattr(context.reference, spec.attribute)
        observed = find_metadata_value(metadata, spec.keys, spec.parse)
        if observed is None or expected is None:
            continue
        detail = ""
        if spec.name == "eos_token_ids":
            expected = sorted(expected)
            missing = set(expected) - set(observed)
            if missing:
                detail = f"; missing {context.stop_list(missing)}"
        elif spec.name == "architectures":
            expected = list(expected)
        if observed == expected:
            continue
        severity = Severity.BUG
        if spec.name == "max_context_length" and observed < expected:
            # A server may cap the context below the model's limit on purpose (--context-length).
            severity = Severity.INFO
        findings.append(
            context.finding(
                Kind.WORKER_METADATA_MISMATCH,
                Layer.WORKER_METADATA,
                capture.mode,
                f"The {capture.mode} worker metadata reports {spec.name}={observed!r} but the model's "
                f"config says {expected!r}{detail}; the router holds metadata that is not this model's.",
                severity=severity,
                expected=expected,
                observed=observed,
                evidence={"field": spec.name},
            )
        )
    return findings


# ---------------------------------------------------------------------------------------
# Sampling params on the wire


def check_wire_params(context: _Context, capture: Capture) -> list[Finding]:
    """Compare the sampling params the router put on the wire with the request's."""
    if not capture.wire:
        return []
    request = capture.request or {}
    params = wire_sampling_params(capture.wire[0])
    findings: list[Finding] = []

    def mismatch(name: str, wire_name: str, expected: Any, observed: Any, note: str = "") -> None:
        findings.append(
            context.finding(
                Kind.SAMPLING_PARAM_MISMATCH,
                Layer.SAMPLING,
                capture.mode,
                f"The request set {name}={expected!r} but the router sent {wire_name}={observed!r} to the "
                f"server{note}; the router translated the request's sampling params wrongly.",
                expected=expected,
                observed=observed,
                evidence={"param": name, "wire_param": wire_name, "wire_sampling_params": params},
            )
        )

    for name in ("temperature", "top_p"):
        if request.get(name) is None:
            continue
        # proto3 omits zero values, so an absent float is 0 on the server.
        observed = params.get(name, 0.0)
        if not math.isclose(float(observed), float(request[name]), abs_tol=FLOAT_TOLERANCE):
            mismatch(name, name, request[name], observed, "" if name in params else " (absent, so 0)")
    if request.get("top_k") is not None:
        observed = params.get("top_k", 0)
        disabled = {-1, 0}
        if not (int(observed) == int(request["top_k"]) or (int(observed) in disabled and int(request["top_k"]) in disabled)):
            mismatch("top_k", "top_k", request["top_k"], observed)
    max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
    if max_tokens is not None and params.get("max_new_tokens") != max_tokens:
        observed = params.get("max_new_tokens")
        mismatch("max_tokens", "max_new_tokens", max_tokens, observed, "" if observed is not None else " (absent, so unlimited)")

    stop = request.get("stop")
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    missing_strings = [s for s in stop_strings if s not in (params.get("stop") or [])]
    if missing_strings:
        mismatch("stop", "stop", stop_strings, list(params.get("stop") or []), f" (missing {missing_strings!r})")
    request_stop_ids = list(request.get("stop_token_ids") or [])
    wire_stop_ids = [int(i) for i in params.get("stop_token_ids") or []]
    missing_ids = [i for i in request_stop_ids if i not in wire_stop_ids]
    if missing_ids:
        mismatch("stop_token_ids", "stop_token_ids", request_stop_ids, wire_stop_ids, f" (missing {missing_ids})")

    expected_skip = bool(request.get("skip_special_tokens", True))
    observed_skip = bool(params.get("skip_special_tokens", False))
    if expected_skip != observed_skip:
        mismatch("skip_special_tokens", "skip_special_tokens", expected_skip, observed_skip,
                 "" if "skip_special_tokens" in params else " (absent, so false)")
    expected_n = int(request.get("n", 1))
    # proto3 sends n=0 when the router leaves it unset, and the server reads that as 1.
    observed_n = int(params.get("n", 0)) or 1
    # A router may also fan n choices out as n calls with n=1 each.
    fanned_out = observed_n == 1 and len(capture.wire) == expected_n
    if expected_n != observed_n and not fanned_out:
        mismatch("n", "n", expected_n, params.get("n", 0))
    return findings


# ---------------------------------------------------------------------------------------
# Stop sets


def check_stop_set(context: _Context, capture: Capture, outputs: list[Output]) -> list[Finding]:
    """Compare the stop ids the wire or the output imply with the reference stop set."""
    findings: list[Finding] = []
    reference_set = context.stop_ids
    request_ids = set(context.case.sampling.stop_token_ids) | set(context.reference.request_stop_ids)
    wire_ids: set[int] = set()
    if capture.wire:
        wire_ids = {int(i) for i in wire_sampling_params(capture.wire[0]).get("stop_token_ids") or []}

    # The router sent a stop list of its own making (more than the request's ids), so the
    # list is meant as the stop set and can be checked against the reference. sglang's
    # scheduler stops on the model's EOS ids by itself unless ignore_eos is set, so EOS ids
    # left out of the list are missing only under ignore_eos. An id that is the single-token
    # encoding of a request stop string (smg sends those as ids) is the request's own stop.
    if wire_ids - request_ids:
        ignore_eos = bool(wire_sampling_params(capture.wire[0]).get("ignore_eos"))
        missing = reference_set - wire_ids if ignore_eos else set()
        string_ids = set()
        for stop_string in context.case.sampling.stop:
            encoded = context.tokenizer.encode(stop_string, add_special_tokens=False)
            if len(encoded) == 1:
                string_ids.add(int(encoded[0]))
        extra = wire_ids - reference_set - request_ids - string_ids
        if missing:
            findings.append(
                context.finding(
                    Kind.STOP_SET_MISSING,
                    Layer.STOP_SET,
                    capture.mode,
                    f"The router sent ignore_eos with stop_token_ids [{context.stop_list(wire_ids)}], "
                    f"without {context.stop_list(missing)}, which the model's generation config lists as "
                    "EOS, so the server will not stop on them.",
                    expected=sorted(reference_set),
                    observed=sorted(wire_ids),
                    expected_text=context.stop_list(missing),
                    evidence={"from": "wire stop_token_ids", "missing": sorted(missing)},
                )
            )
        if extra:
            findings.append(
                context.finding(
                    Kind.STOP_SET_EXTRA,
                    Layer.STOP_SET,
                    capture.mode,
                    f"The router sent stop_token_ids with {context.stop_list(extra)}, which neither the "
                    "model nor the request declares as a stop.",
                    expected=sorted(reference_set),
                    observed=sorted(wire_ids),
                    observed_text=context.stop_list(extra),
                    evidence={"from": "wire stop_token_ids", "extra": sorted(extra)},
                )
            )

    for output in outputs:
        # A reference stop id inside the observed ids means generation did not stop on it.
        if output.observed:
            ids = output.ids or []
            for position, token_id in enumerate(ids[:-1]):
                if token_id in reference_set:
                    findings.append(
                        context.finding(
                            Kind.STOP_SET_MISSING,
                            Layer.STOP_SET,
                            capture.mode,
                            f"The {capture.mode} output contains stop id {token_id} {context.piece(token_id)!r} "
                            f"at output position {position} and continued for {len(ids) - position - 1} more "
                            "tokens, so the serving stop set lacks it.",
                            stream="output",
                            position=position,
                            expected=[token_id],
                            observed=ids[position : position + 2],
                            expected_text=context.piece(token_id),
                            observed_text=context.pieces(ids[position : position + 2]),
                            choice_index=output.index,
                            evidence={
                                "from": "observed output",
                                "tokens": context.window(ids[: position + 1], ids, (position, position), positional=True),
                            },
                        )
                    )
                    break
        event = stop_event(output, reference_set | wire_ids)
        if event is not None and isinstance(event[1], int) and event[1] not in reference_set | wire_ids:
            position, token_id = event
            findings.append(
                context.finding(
                    Kind.STOP_SET_EXTRA,
                    Layer.STOP_SET,
                    capture.mode,
                    f"The {capture.mode} output stopped on id {token_id} {context.piece(token_id)!r} at output "
                    f"position {position}, which is not in the reference stop set; the server's stop set "
                    "has an extra id.",
                    stream="output",
                    position=position,
                    expected=sorted(reference_set),
                    observed=token_id,
                    observed_text=context.piece(token_id),
                    choice_index=output.index,
                    evidence={"from": "observed stop"},
                )
            )
    return findings


def check_stop_strings(context: _Context, outputs: dict[str, list[Output]]) -> list[Finding]:
    """Find stop strings that one side honoured and another generated past."""
    findings: list[Finding] = []
    for stop in context.stop_strings:
        honoured: dict[tuple[str, int], bool] = {}
        for mode, mode_outputs in outputs.items():
            for output in mode_outputs:
                if output.text is None:
                    continue
                honoured[(mode, output.index)] = output.matched_stop == stop or stop not in output.text
        if all(honoured.values()):
            continue
        for (mode, index), ok in honoured.items():
            if ok:
                continue
            output = next(o for o in outputs[mode] if o.index == index)
            at = output.text.index(stop)
            others = [m for (m, i), good in honoured.items() if good and m != mode]
            layer = Layer.DETOKENIZER if mode == "grpc" else Layer.STOP_SET
            owner = (
                "in gRPC mode the router matches stop strings while detokenizing"
                if mode == "grpc"
                else "the server matches stop strings"
            )
            side_note = f"{', '.join(others)} honoured it" if others else "no side honoured it"
            findings.append(
                context.finding(
                    Kind.STOP_STRING_ONE_SIDE,
                    layer,
                    mode,
                    f"The {mode} text contains stop string {stop!r} at character {at} and generation went on "
                    f"(finish {output.finish_reason}, matched {output.matched_stop!r}) while {side_note}; {owner}.",
                    stream="output",
                    expected=stop,
                    observed=output.matched_stop,
                    expected_text=stop,
                    observed_text=_text_context(output.text, at),
                    choice_index=index,
                    evidence={"character": at},
                )
            )
    return findings


# ---------------------------------------------------------------------------------------
# Finish, usage and detokenization within one side


def check_finish(context: _Context, capture: Capture, outputs: list[Output]) -> list[Finding]:
    """Check the response's finish fields against the wire's and against the output ids."""
    findings: list[Finding] = []
    completions = {c.index: c for record in capture.wire for c in record.completions}
    for output in outputs:
        completion = completions.get(output.index)
        if completion is not None and (
            completion.finish_reason != output.finish_reason or completion.matched_stop != output.matched_stop
        ):
            findings.append(
                context.finding(
                    Kind.FINISH_MISMATCH,
                    Layer.RESPONSE,
                    capture.mode,
                    f"The server returned finish_reason={completion.finish_reason!r}, matched_stop="
                    f"{completion.matched_stop!r} on the wire but the router answered finish_reason="
                    f"{output.finish_reason!r}, matched_stop={output.matched_stop!r}; the router rewrote them.",
                    expected={"finish_reason": completion.finish_reason, "matched_stop": completion.matched_stop},
                    observed={"finish_reason": output.finish_reason, "matched_stop": output.matched_stop},
                    choice_index=output.index,
                )
            )
        ids = output.ids or []
        matched = output.matched_stop
        if (
            output.observed
            and output.finish_reason == "stop"
            and isinstance(matched, int)
            and ids
            and ids[-1] != matched
        ):
            findings.append(
                context.finding(
                    Kind.FINISH_MISMATCH,
                    Layer.RESPONSE,
                    capture.mode,
                    f"The {capture.mode} response names matched_stop {matched} {context.piece(matched)!r} but "
                    f"its last output id is {ids[-1]} {context.piece(ids[-1])!r}.",
                    stream="output",
                    position=len(ids) - 1,
                    expected=matched,
                    observed=ids[-1],
                    expected_text=context.piece(matched),
                    observed_text=context.piece(ids[-1]),
                    choice_index=output.index,
                )
            )
    return findings


def check_usage(context: _Context, capture: Capture, outputs: list[Output]) -> list[Finding]:
    """Check usage counts against the observed prompt and output ids."""
    findings: list[Finding] = []
    usage = capture.usage or {}
    if capture.prompt_ids is not None and usage.get("prompt_tokens") is not None:
        if usage["prompt_tokens"] != len(capture.prompt_ids):
            findings.append(
                context.finding(
                    Kind.PROMPT_COUNT_MISMATCH,
                    Layer.RESPONSE,
                    capture.mode,
                    f"The {capture.mode} usage reports {usage['prompt_tokens']} prompt tokens but "
                    f"{len(capture.prompt_ids)} prompt ids were observed ({capture.prompt_ids_source}); "
                    "the response's usage does not count what was sent.",
                    stream="prompt",
                    expected=len(capture.prompt_ids),
                    observed=usage["prompt_tokens"],
                    evidence={"usage": usage},
                )
            )
    observed_outputs = [o for o in outputs if o.observed]
    if usage.get("completion_tokens") is not None and observed_outputs and len(observed_outputs) == len(outputs):
        counted = sum(len(o.ids or []) for o in observed_outputs)
        if usage["completion_tokens"] != counted:
            findings.append(
                context.finding(
                    Kind.USAGE_MISMATCH,
                    Layer.RESPONSE,
                    capture.mode,
                    f"The {capture.mode} usage reports {usage['completion_tokens']} completion tokens but "
                    f"{counted} output ids were observed; the response's usage does not count what was generated.",
                    stream="output",
                    expected=counted,
                    observed=usage["completion_tokens"],
                    evidence={"usage": usage},
                )
            )
    for number, record in enumerate(capture.wire):
        for completion in record.completions:
            if completion.prompt_tokens and completion.prompt_tokens != len(record.request.prompt_ids):
                findings.append(
                    context.finding(
                        Kind.USAGE_MISMATCH,
                        Layer.TRANSPORT,
                        capture.mode,
                        f"The server counted {completion.prompt_tokens} prompt tokens for Generate call {number} "
                        f"but the call carried {len(record.request.prompt_ids)} ids; the server did not "
                        "process the prompt it was sent.",
                        stream="prompt",
                        expected=len(record.request.prompt_ids),
                        observed=completion.prompt_tokens,
                        choice_index=completion.index,
                    )
                )
    return findings


def check_detokenizer(context: _Context, capture: Capture, outputs: list[Output]) -> list[Finding]:
    """Compare each side's text with the decoded text of its own observed ids."""
    findings: list[Finding] = []
    skip_special = True
    if capture.wire:
        skip_special = bool(wire_sampling_params(capture.wire[0]).get("skip_special_tokens", True))
    for output in outputs:
        if not output.observed or output.text is None:
            continue
        ids = output.ids or []
        expected_text = decode_ids(context.tokenizer, ids, skip_special_tokens=skip_special) or ""
        accepted = {expected_text}
        matched = output.matched_stop
        if isinstance(matched, int) and not isinstance(matched, bool) and ids and ids[-1] == matched:
            # sglang's detokenizer drops a matched stop token from the text unless the request
            # sets no_stop_trim; for a special token the cut changes nothing.
            accepted.add(decode_ids(context.tokenizer, ids[:-1], skip_special_tokens=skip_special) or "")
        if isinstance(output.matched_stop, str) and output.matched_stop in expected_text:
            # sglang cuts the stop string from the text unless the request sets no_stop_trim,
            # so both the cut and the uncut text are correct.
            expected_text = expected_text[: expected_text.index(output.matched_stop)]
            accepted.add(expected_text)
        if output.text in accepted:
            continue
        character = _first_text_difference(expected_text, output.text)
        # The drifting token is the first whose decoded prefix reaches past the first
        # differing character; text beyond every id points at the last id.
        position = max(len(ids) - 1, 0)
        for k in range(len(ids)):
            prefix = decode_ids(context.tokenizer, ids[: k + 1], skip_special_tokens=skip_special) or ""
            if len(prefix) > character:
                position = k
                break
        owner = "the router detokenizes in gRPC mode" if capture.mode == "grpc" else "the server detokenized"
        findings.append(
            context.finding(
                Kind.DETOKENIZER_DRIFT,
                Layer.DETOKENIZER,
                capture.mode,
                f"The {capture.mode} text differs from its own ids decoded with skip_special_tokens="
                f"{skip_special} from output position {position} (character {character}: expected "
                f"{_text_context(expected_text, character)!r}, observed {_text_context(output.text, character)!r}); "
                f"{owner}.",
                stream="output",
                position=position,
                expected=ids[position : position + 1],
                observed=ids[position : position + 1],
                expected_text=expected_text,
                observed_text=output.text,
                choice_index=output.index,
                evidence={"character": character},
            )
        )
    return findings


# ---------------------------------------------------------------------------------------
# Output streams across sides


def compare_outputs(
    context: _Context, side_outputs: list[Output], baseline_outputs: list[Output], prompt_layer: Layer | None
) -> list[Finding]:
    """Compare one side's choices with the baseline's: spurious stops, divergence, near-ties."""
    findings: list[Finding] = []
    baseline_by_index = {o.index: o for o in baseline_outputs}
    for output in side_outputs:
        baseline = baseline_by_index.get(output.index)
        if baseline is None:
            continue
        findings += _spurious_stops(context, output, baseline, prompt_layer)
        findings += _spurious_stops(context, baseline, output, None)
        if context.case.deterministic:
            findings += _divergence(context, output, baseline, prompt_layer)
            findings += _finish_across(context, output, baseline)
    return findings


def _comparable_ids(context: _Context, output: Output, baseline: Output) -> tuple[list[int], list[int], bool]:
    """Return both sides' ids in like terms, and whether they are re-encoded text (weak)."""
    if output.observed and baseline.observed:
        return list(output.ids or []), list(baseline.ids or []), False

    def encoded(item: Output) -> list[int]:
        if item.observed:
            return context.tokenizer.encode(item.text or "", add_special_tokens=False)
        return list(item.ids or [])

    return encoded(output), encoded(baseline), True


def _spurious_stops(context: _Context, stopped: Output, other: Output, prompt_layer: Layer | None) -> list[Finding]:
    """Report ``stopped`` ending on a token at a position that ``other`` generated past."""
    event = stop_event(stopped, context.stop_ids | stopped.wire_stop_ids)
    if event is None or isinstance(event[1], str):
        return []
    position, token_id = event
    other_length = generated_length(other)
    if other_length is None or other_length <= position + 1:
        return []
    piece = context.piece(token_id)
    stop_on_other_side = token_id in context.stop_ids | other.wire_stop_ids
    deterministic = context.case.deterministic

    if deterministic and stop_on_other_side:
        # Either the other side chose another token (a divergence) or it generated the stop
        # id and went on, which check_stop_set reports on that side.
        return []
    if deterministic and stopped.observed and other.observed:
        if common_prefix_length(stopped.ids or [], other.ids or []) < position:
            return []  # the streams diverged before the stop; the divergence finding covers it
    elif deterministic:
        # One side's ids are re-encoded text: the other side must have generated the same
        # text and more, or the streams diverged before the stop.
        if stopped.text is None or other.text is None or not other.text.startswith(stopped.text):
            return []
    elif position != 0:
        return []  # a sampled stream may stop anywhere; only a stop at position 0 is compared

    if not stop_on_other_side:
        severity = Severity.BUG
        layer = Layer.STOP_SET
        cause = f"{token_id} is a stop id on {stopped.mode} only, so its stop set has an extra id"
    else:
        severity = Severity.INFO
        layer = Layer.SAMPLING
        cause = f"{token_id} is a stop id on both sides and the case is sampled without a seed, so this can be chance"
        if prompt_layer is not None:
            layer = prompt_layer
            cause = (
                f"{token_id} is a stop id on both sides; the prompt findings on {stopped.mode} above are the "
                "likely cause, because the model ends its turn at once on a malformed prompt"
            )
    return [
        context.finding(
            Kind.SPURIOUS_STOP,
            layer,
            stopped.mode,
            f"{stopped.mode} stopped at output position {position} on {token_id} {piece!r} "
            f"(finish {stopped.finish_reason}, matched_stop {stopped.matched_stop!r}) while {other.mode} "
            f"generated {other_length} tokens; {cause}.",
            severity=severity,
            stream="output",
            position=position,
            expected=(other.ids or [])[position] if other.observed and other.ids and len(other.ids) > position else None,
            observed=token_id,
            expected_text=_output_excerpt(context, other),
            observed_text=piece,
            baseline=other.mode,
            choice_index=stopped.index,
            evidence={
                "other_length": other_length,
                "other_source": other.source,
                "stopped_text": stopped.text,
                "tokens": context.window(other.ids or [], stopped.ids or [], (position, position), positional=True)
                if stopped.observed
                else None,
            },
        )
    ]


def _output_excerpt(context: _Context, output: Output, limit: int = 60) -> str | None:
    text = output.text if output.text is not None else context.pieces(output.ids)
    if text is None:
        return None
    return text if len(text) <= limit else text[:limit] + "…"


def _divergence(context: _Context, output: Output, baseline: Output, prompt_layer: Layer | None) -> list[Finding]:
    """Report the first output token where a deterministic side departs from the baseline."""
    if output.ids is None or baseline.ids is None:
        return []
    side_ids, base_ids, weak = _comparable_ids(context, output, baseline)
    prefix = common_prefix_length(side_ids, base_ids)
    if prefix == len(side_ids) or prefix == len(base_ids):
        return []  # one stream is a prefix of the other: a stop or length question, checked elsewhere

    expected_id, observed_id = base_ids[prefix], side_ids[prefix]
    tie = _near_tie(context, output, baseline, prefix, observed_id, expected_id) if not weak else None
    evidence: dict[str, Any] = {
        "matched_prefix": prefix,
        "matched_prefix_text": context.pieces(side_ids[:prefix]),
        "tokens": context.window(base_ids, side_ids, (prefix, prefix), positional=True),
        "ids_source": {output.mode: output.source, baseline.mode: baseline.source},
    }
    note = " (ids re-encoded from text, weaker evidence)" if weak else ""
    if tie is not None:
        evidence["logprobs"] = tie
        kind, layer, severity = Kind.NEAR_TIE, Layer.SAMPLING, Severity.NEAR_TIE
        explanation = (
            f"{output.mode} chose {observed_id} {context.piece(observed_id)!r} and {baseline.mode} chose "
            f"{expected_id} {context.piece(expected_id)!r} at output position {prefix}, and each is in the "
            "other's top logprobs; the candidates are near-equal, so this is numerics, not a bug."
        )
    else:
        kind = Kind.OUTPUT_DIVERGENCE
        if prompt_layer is not None:
            severity, layer = Severity.INFO, prompt_layer
            cause = f"the prompt ids of {output.mode} differ (see above), which explains a different answer"
        elif output.logprobs and baseline.logprobs:
            severity, layer = Severity.BUG, Layer.SAMPLING
            cause = "the tokens are not in each other's top logprobs, so the sides did not sample the same distribution"
        else:
            severity, layer = Severity.BUG, Layer.SAMPLING
            cause = (
                "no logprobs were returned on both sides, so a near-tie cannot be ruled out "
                "(request logprobs with top_logprobs to tell)"
            )
        explanation = (
            f"{output.mode} departs from {baseline.mode} at output position {prefix} after {prefix} matching "
            f"tokens (expected {expected_id} {context.piece(expected_id)!r}, observed {observed_id} "
            f"{context.piece(observed_id)!r}){note}; {cause}."
        )
    return [
        context.finding(
            kind,
            layer,
            output.mode,
            explanation,
            severity=severity,
            stream="output",
            position=prefix,
            expected=[expected_id],
            observed=[observed_id],
            expected_text=context.piece(expected_id),
            observed_text=context.piece(observed_id),
            baseline=baseline.mode,
            choice_index=output.index,
            evidence=evidence,
        )
    ]


def _near_tie(
    context: _Context, output: Output, baseline: Output, position: int, observed_id: int, expected_id: int
) -> dict[str, Any] | None:
    """Return the two top lists when each side's token is in the other's top-k, else None."""
    side_entry = _logprob_at(output.logprobs, position)
    base_entry = _logprob_at(baseline.logprobs, position)
    if side_entry is None or base_entry is None:
        return None
    if _in_top(context, expected_id, side_entry) and _in_top(context, observed_id, base_entry):
        return {
            output.mode: [[alt, lp] for alt, lp in side_entry.top],
            baseline.mode: [[alt, lp] for alt, lp in base_entry.top],
        }
    return None


def _logprob_at(logprobs: list[TokenLogprob] | None, position: int) -> TokenLogprob | None:
    if not logprobs or position >= len(logprobs):
        return None
    return logprobs[position]


def _in_top(context: _Context, token_id: int, entry: TokenLogprob) -> bool:
    """Return True when ``token_id`` is among ``entry``'s alternatives, given by id or by text."""
    piece = context.piece(token_id)
    for alternative, _ in entry.top:
        if alternative == token_id or (isinstance(alternative, str) and alternative == piece):
            return True
    return False


def _finish_across(context: _Context, output: Output, baseline: Output) -> list[Finding]:
    """Compare finish fields of two sides whose deterministic outputs agree token for token."""
    if output.ids is None or baseline.ids is None:
        return []
    side_ids, base_ids, weak = _comparable_ids(context, output, baseline)
    if side_ids != base_ids:
        return []
    if (output.finish_reason, output.matched_stop) == (baseline.finish_reason, baseline.matched_stop):
        return []
    layer = Layer.STOP_SET if output.matched_stop != baseline.matched_stop else Layer.RESPONSE
    return [
        context.finding(
            Kind.FINISH_MISMATCH,
            layer,
            output.mode,
            f"{output.mode} and {baseline.mode} generated the same tokens but {output.mode} reports "
            f"finish_reason={output.finish_reason!r}, matched_stop={output.matched_stop!r} and {baseline.mode} "
            f"finish_reason={baseline.finish_reason!r}, matched_stop={baseline.matched_stop!r}"
            f"{' (ids re-encoded from text, weaker evidence)' if weak else ''}.",
            expected={"finish_reason": baseline.finish_reason, "matched_stop": baseline.matched_stop},
            observed={"finish_reason": output.finish_reason, "matched_stop": output.matched_stop},
            baseline=baseline.mode,
            choice_index=output.index,
        )
    ]
