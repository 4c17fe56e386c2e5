"""The HF reference on the real Gemma 3 fixture: prompt ids, stop set, template behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cases import Case, Message, Sampling, load_cases
from harness.fixture import FixtureError, build_fixture
from harness.reference import ChatTemplateError, build_reference, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent

# "<bos><start_of_turn>user\nWhy sky is blue?<end_of_turn>\n<start_of_turn>model\n"
WHY_SKY_IDS = [2, 105, 2364, 107, 11355, 7217, 563, 3730, 236881, 106, 107, 105, 4368, 107]
BOS, EOS, START_OF_TURN, END_OF_TURN, NEWLINE = 2, 1, 105, 106, 107


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return build_fixture()


def make_case(*messages: tuple[str, str], **sampling) -> Case:
    return Case(
        id="gemma-test",
        model="google/gemma-3-270m-it",
        messages=[Message(role, content) for role, content in messages],
        sampling=Sampling(**sampling),
    )


@pytest.mark.slow
def test_prompt_ids_of_reported_case(gemma_dir):
    reference = build_reference(make_case(("user", "Why sky is blue?")), gemma_dir)
    assert reference.prompt_text == "<bos><start_of_turn>user\nWhy sky is blue?<end_of_turn>\n<start_of_turn>model\n"
    assert reference.prompt_ids == WHY_SKY_IDS
    assert reference.prompt_ids.count(BOS) == 1


@pytest.mark.slow
def test_stop_set_and_sources(gemma_dir):
    reference = build_reference(make_case(("user", "hi")), gemma_dir)
    assert reference.stop_ids == [EOS, END_OF_TURN]
    assert reference.eos_ids == [EOS, END_OF_TURN]
    assert reference.stop_id_sources[EOS] == ["generation_config.json", "config.json", "tokenizer eos_token"]
    assert reference.stop_id_sources[END_OF_TURN] == ["generation_config.json"]


@pytest.mark.slow
def test_model_metadata(gemma_dir):
    reference = build_reference(make_case(("user", "hi")), gemma_dir)
    assert reference.vocab_size == 262144
    assert reference.bos_id == BOS
    assert reference.pad_id == 0
    assert reference.model_type == "gemma3_text"
    assert reference.architectures == ["Gemma3ForCausalLM"]
    assert reference.max_context_length == 32768
    assert reference.model_dir == str(gemma_dir.resolve())


@pytest.mark.slow
def test_special_tokens_table(gemma_dir):
    reference = build_reference(make_case(("user", "hi")), gemma_dir)
    assert reference.special_tokens[BOS] == "<bos>"
    assert reference.special_tokens[START_OF_TURN] == "<start_of_turn>"
    assert reference.special_tokens[END_OF_TURN] == "<end_of_turn>"
    # "\n" is an added token of the Gemma tokenizer but not a special one.
    assert NEWLINE not in reference.special_tokens
    data = reference.to_dict()
    assert data["special_tokens"][str(END_OF_TURN)] == "<end_of_turn>"
    assert data["stop_id_sources"][str(END_OF_TURN)] == ["generation_config.json"]
    json.dumps(data)


@pytest.mark.slow
def test_generation_prompt_ids(gemma_dir):
    for case in (
        make_case(("user", "Why sky is blue?")),
        make_case(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Why?")),
    ):
        reference = build_reference(case, gemma_dir)
        assert reference.generation_prompt_ids == [START_OF_TURN, 4368, NEWLINE]
        assert reference.prompt_ids[-3:] == reference.generation_prompt_ids


@pytest.mark.slow
def test_system_prompt_folds_into_user_turn(gemma_dir):
    case = make_case(("system", "  Be brief. "), ("user", "Why sky is blue?"))
    reference = build_reference(case, gemma_dir)
    assert reference.prompt_text == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhy sky is blue?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert "system" not in reference.prompt_text
    assert reference.prompt_ids.count(START_OF_TURN) == 2


@pytest.mark.slow
def test_assistant_renders_as_model(gemma_dir):
    case = make_case(("user", "Sky color?"), ("assistant", "Blue."), ("user", "Why?"))
    reference = build_reference(case, gemma_dir)
    assert reference.prompt_text == (
        "<bos><start_of_turn>user\nSky color?<end_of_turn>\n"
        "<start_of_turn>model\nBlue.<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "assistant" not in reference.prompt_text
    assert reference.prompt_ids.count(END_OF_TURN) == 3


@pytest.mark.slow
def test_alternation_violation_raises(gemma_dir):
    for case in (
        make_case(("user", "a"), ("user", "b")),
        make_case(("assistant", "a")),
        make_case(("system", "a"), ("assistant", "b")),
    ):
        with pytest.raises(ChatTemplateError) as raised:
            build_reference(case, gemma_dir)
        assert "Conversation roles must alternate" in raised.value.reason
        assert str(gemma_dir.resolve()) in str(raised.value)


@pytest.mark.slow
def test_request_stops_are_carried(gemma_dir):
    case = make_case(("user", "hi"), stop=[".", "\n\n"], stop_token_ids=[NEWLINE])
    reference = build_reference(case, gemma_dir)
    assert reference.stop_strings == [".", "\n\n"]
    assert reference.request_stop_ids == [NEWLINE]
    assert reference.stop_ids == [EOS, END_OF_TURN]


@pytest.mark.slow
def test_prompt_ids_match_tokenized_template(gemma_dir):
    # sglang's HTTP server tokenizes with apply_chat_template(tokenize=True); the reference
    # renders text and encodes it, which must give the same ids for every case we ship.
    tokenizer = load_tokenizer(gemma_dir)
    for case in load_cases(REPO_ROOT / "cases" / "gemma.yaml"):
        reference = build_reference(case, gemma_dir, tokenizer=tokenizer)
        conversation = [{"role": m.role, "content": m.content} for m in case.messages]
        encoded = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        assert reference.prompt_ids == list(encoded["input_ids"]), case.id
        assert reference.prompt_ids[0] == BOS, case.id


@pytest.mark.slow
def test_load_tokenizer_is_cached(gemma_dir):
    assert load_tokenizer(gemma_dir) is load_tokenizer(str(gemma_dir) + "/")


@pytest.mark.slow
def test_stop_set_without_generation_config(tmp_path, gemma_dir):
    # A folder with the same files except generation_config.json loses <end_of_turn>.
    for path in gemma_dir.iterdir():
        if path.name != "generation_config.json":
            (tmp_path / path.name).symlink_to(path)
    reference = build_reference(make_case(("user", "hi")), tmp_path)
    assert reference.stop_ids == [EOS]
    assert reference.stop_id_sources == {EOS: ["config.json", "tokenizer eos_token"]}
    assert reference.prompt_ids[0] == BOS


@pytest.mark.slow
def test_generation_config_single_eos(tmp_path, gemma_dir):
    for path in gemma_dir.iterdir():
        if path.name != "generation_config.json":
            (tmp_path / path.name).symlink_to(path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": END_OF_TURN}))
    reference = build_reference(make_case(("user", "hi")), tmp_path)
    assert reference.stop_ids == [EOS, END_OF_TURN]
    assert reference.stop_id_sources[END_OF_TURN] == ["generation_config.json"]


def test_missing_model_dir_raises(tmp_path):
    missing = tmp_path / "absent"
    with pytest.raises(FixtureError) as raised:
        build_reference(make_case(("user", "hi")), missing)
    assert str(missing) in str(raised.value)
    assert "not found" in str(raised.value)


def test_incomplete_model_dir_names_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FixtureError) as raised:
        build_reference(make_case(("user", "hi")), tmp_path)
    message = str(raised.value)
    assert str(tmp_path) in message
    assert "tokenizer.json is missing" in message
    assert "\n" not in message
