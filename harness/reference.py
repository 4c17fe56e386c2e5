"""The reference: the prompt and the stop set of a case as HF transformers computes them.

The prompt is the model folder's chat template rendered by transformers, encoded the way
sglang's HTTP server encodes it. The stop set is every EOS id the folder declares, each with
the file it came from, so a missing id can be traced to the file a router failed to read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.fixture import FixtureError, check_model_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from harness.cases import Case, Message

# Names of the places an EOS id can come from, as stored in Reference.stop_id_sources.
SOURCE_GENERATION_CONFIG = "generation_config.json"
SOURCE_CONFIG = "config.json"
SOURCE_TOKENIZER = "tokenizer eos_token"


@dataclass
class Reference:
    case_id: str
    model_dir: str
    # The chat template rendered by transformers with add_generation_prompt=True, and its ids
    # encoded without adding special tokens again (the template writes <bos> itself), which
    # is how sglang's HTTP server builds the prompt.
    prompt_text: str
    prompt_ids: list[int]
    # The ids that end generation when the case sets no stop ids of its own: the EOS ids of
    # generation_config.json, config.json and the tokenizer, each with the sources that
    # declare it. ``ignore_eos`` does not change this set.
    stop_ids: list[int]
    stop_id_sources: dict[int, list[str]]
    bos_id: int | None
    # The EOS ids the model's config files declare (generation_config.json and config.json),
    # without the tokenizer's.
    eos_ids: list[int]
    pad_id: int | None
    vocab_size: int
    model_type: str
    architectures: list[str]
    # max_position_embeddings of config.json.
    max_context_length: int | None
    # The generation prompt the template appends, as ids (e.g. "<start_of_turn>model\n").
    generation_prompt_ids: list[int] = field(default_factory=list)
    # Id -> token text for every added token the tokenizer flags as special; these are the
    # tokens skip_special_tokens drops when decoding.
    special_tokens: dict[int, str] = field(default_factory=dict)
    # The case's own stop strings and stop ids, kept here so the diff needs only this object.
    stop_strings: list[str] = field(default_factory=list)
    request_stop_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        data = asdict(self)
        data["stop_id_sources"] = {str(k): v for k, v in self.stop_id_sources.items()}
        data["special_tokens"] = {str(k): v for k, v in self.special_tokens.items()}
        return data


class ChatTemplateError(ValueError):
    """The chat template raised while rendering a conversation; ``reason`` is its message."""

    def __init__(self, model_dir: str, reason: str) -> None:
        self.model_dir = model_dir
        self.reason = reason
        super().__init__(f"the chat template of {model_dir} raised: {reason}")


def load_tokenizer(model_dir: str | Path) -> "PreTrainedTokenizerBase":
    """Load the tokenizer of an HF-format model folder once per process and folder.

    Raises FixtureError naming the folder and the missing file when the folder is incomplete.
    """
    folder = Path(model_dir).expanduser().resolve()
    check_model_dir(folder)
    return _load_tokenizer_cached(str(folder))


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(folder: str) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def render_prompt(
    tokenizer: "PreTrainedTokenizerBase", messages: "list[Message]", add_generation_prompt: bool = True
) -> str:
    """Render messages with the tokenizer's chat template; raise ChatTemplateError if it raises."""
    import jinja2

    folder = str(getattr(tokenizer, "name_or_path", "") or "the tokenizer")
    if not tokenizer.chat_template:
        raise FixtureError(
            f"model folder {folder} has no chat template: add chat_template.jinja "
            "or a chat_template entry in tokenizer_config.json"
        )
    conversation = [{"role": message.role, "content": message.content} for message in messages]
    try:
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as error:
        # Templates reject conversations with raise_exception(), which raises a TemplateError.
        raise ChatTemplateError(folder, str(error)) from error


def encode_prompt(tokenizer: "PreTrainedTokenizerBase", prompt_text: str) -> list[int]:
    """Encode rendered chat text the way sglang's HTTP server does.

    sglang 0.5.7 (serving_chat.py, ``_apply_jinja_template``) calls
    ``tokenizer.apply_chat_template(..., tokenize=True, add_generation_prompt=True)``, and
    transformers encodes the rendered text with ``add_special_tokens=False`` in that call
    (checked in transformers 5.25, ``tokenization_utils_base.apply_chat_template``). The
    template writes <bos> itself, so adding special tokens here would give two.
    """
    return list(tokenizer.encode(prompt_text, add_special_tokens=False))


def build_reference(
    case: "Case", model_dir: str | Path, tokenizer: "PreTrainedTokenizerBase | None" = None
) -> Reference:
    """Build the reference prompt, stop set and model metadata of one case.

    Raises FixtureError for a missing or incomplete model folder (naming the folder and the
    file) or a folder without chat template, and ChatTemplateError when the template
    rejects the case's messages.
    """
    folder = Path(model_dir).expanduser().resolve()
    check_model_dir(folder)
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)

    prompt_text = render_prompt(tokenizer, case.messages, add_generation_prompt=True)
    prompt_ids = encode_prompt(tokenizer, prompt_text)
    without_prompt = render_prompt(tokenizer, case.messages, add_generation_prompt=False)
    generation_prompt_ids = _generation_prompt_ids(tokenizer, prompt_ids, without_prompt, prompt_text)

    config = _read_json(folder / "config.json")
    generation_config_path = folder / "generation_config.json"
    # NOTE: generation_config.json is optional in HF folders; without it the stop set holds
    # only the ids of config.json and the tokenizer.
    generation_config = _read_json(generation_config_path) if generation_config_path.is_file() else {}
    # Multimodal configs (e.g. transformers' Gemma3Config) keep the text model's values under
    # text_config.
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    sources: dict[int, list[str]] = {}
    for source, value in (
        (SOURCE_GENERATION_CONFIG, generation_config.get("eos_token_id")),
        (SOURCE_CONFIG, _first_set(config.get("eos_token_id"), text_config.get("eos_token_id"))),
        (SOURCE_TOKENIZER, tokenizer.eos_token_id),
    ):
        for token_id in _as_id_list(value, folder / source if source != SOURCE_TOKENIZER else folder):
            sources.setdefault(token_id, []).append(source)
    eos_ids = sorted(
        token_id
        for token_id, names in sources.items()
        if SOURCE_GENERATION_CONFIG in names or SOURCE_CONFIG in names
    )

    vocab_size = _first_set(config.get("vocab_size"), text_config.get("vocab_size"))
    if not isinstance(vocab_size, int):
        raise FixtureError(f"model folder {folder} is incomplete: config.json has no integer vocab_size")

    special_tokens = {
        token_id: token.content for token_id, token in sorted(tokenizer.added_tokens_decoder.items()) if token.special
    }
    return Reference(
        case_id=case.id,
        model_dir=str(folder),
        prompt_text=prompt_text,
        prompt_ids=prompt_ids,
        stop_ids=sorted(sources),
        stop_id_sources={token_id: sources[token_id] for token_id in sorted(sources)},
        bos_id=tokenizer.bos_token_id,
        eos_ids=eos_ids,
        pad_id=tokenizer.pad_token_id,
        vocab_size=vocab_size,
        model_type=str(config.get("model_type", "")),
        architectures=list(config.get("architectures") or []),
        max_context_length=_first_set(
            config.get("max_position_embeddings"), text_config.get("max_position_embeddings")
        ),
        generation_prompt_ids=generation_prompt_ids,
        special_tokens=special_tokens,
        stop_strings=list(case.sampling.stop),
        request_stop_ids=list(case.sampling.stop_token_ids),
    )


def _generation_prompt_ids(
    tokenizer: "PreTrainedTokenizerBase", prompt_ids: list[int], without_prompt: str, prompt_text: str
) -> list[int]:
    """Return the ids the generation prompt adds: prompt ids minus those of the text without it."""
    base_ids = encode_prompt(tokenizer, without_prompt)
    if prompt_ids[: len(base_ids)] == base_ids:
        return prompt_ids[len(base_ids) :]
    # NOTE: when the two encodings differ before the generation prompt (a merge across the
    # boundary), the added text is encoded on its own, which may differ from its ids in context.
    if prompt_text.startswith(without_prompt):
        return encode_prompt(tokenizer, prompt_text[len(without_prompt) :])
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FixtureError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise FixtureError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def _first_set(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _as_id_list(value: Any, where: Path) -> list[int]:
    """Read an eos_token_id entry, which HF allows as null, one int or a list of ints."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        raise FixtureError(f"{where}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return list(items)
