"""The CPU engine against real clients: grpcio stubs and requests, on the Gemma 3 fixture.

The engine runs as a subprocess on free loopback ports, with a 512-token context so an
over-long prompt is cheap to send. Greedy output is checked token for token against
transformers' ``generate`` on the same weights.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

GEMMA_PROMPT_IDS = [2, 105, 2364, 107, 11355, 7217, 563, 3730, 236881, 106, 107, 105, 4368, 107]
END_OF_TURN = 106
CONTEXT_LENGTH = 512
GREEDY_TOKENS = 24
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_engine_missing_model_dir_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness", "engine", "--model-dir", str(tmp_path / "absent"), "--grpc-port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "--model-dir" in error_lines[0]


def test_engine_without_ports_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness", "engine", "--model-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--grpc-port" in result.stderr


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from harness.fixture import build_fixture

    return build_fixture()


@pytest.fixture(scope="module")
def reference_greedy(model_dir: Path) -> dict:
    """transformers' greedy ids and first-step log-probabilities for the Gemma prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.inference_mode():
        prompt = torch.tensor([GEMMA_PROMPT_IDS])
        generated = model.generate(prompt, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        first_logits = model(prompt).logits[0, -1].float()
    ids = generated[0, len(GEMMA_PROMPT_IDS) :].tolist()
    first_logprobs = torch.log_softmax(first_logits, dim=-1)
    del model
    return {"ids": ids, "first_logprobs": first_logprobs}


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    grpc_port, http_port = _free_port(), _free_port()
    log_path = tmp_path_factory.mktemp("engine") / "engine.log"
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness",
            "engine",
            "--model-dir",
            str(model_dir),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--context-length",
            str(CONTEXT_LENGTH),
            "--log-level",
            "DEBUG",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = log_path.read_text()
            if "gRPC listener ready" in text and "HTTP listener ready" in text:
                break
            if process.poll() is not None:
                pytest.fail(f"engine exited with {process.returncode} before it was ready:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"engine not ready after {START_TIMEOUT_S} s:\n{text[-3000:]}")
            time.sleep(0.5)
        yield {
            "grpc": f"127.0.0.1:{grpc_port}",
            "http": f"http://127.0.0.1:{http_port}",
            "process": process,
            "log": log_path,
        }
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()


@pytest.fixture(scope="module")
def stub(engine):
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(engine["grpc"])
    grpc.channel_ready_future(channel).result(timeout=30)
    yield pb_grpc.SglangSchedulerStub(channel)
    channel.close()


def _request(request_id: str, ids: list[int] | None = None, stream: bool = False, **sampling):
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    options = {key: sampling.pop(key) for key in ("return_logprob", "top_logprobs_num") if key in sampling}
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("top_p", 1.0)
    sampling.setdefault("top_k", -1)
    return pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(input_ids=ids or GEMMA_PROMPT_IDS, original_text=""),
        sampling_params=pb.SamplingParams(**sampling),
        stream=stream,
        **options,
    )


def _completes(stub, request) -> list:
    return [r.complete for r in stub.Generate(request, timeout=120) if r.HasField("complete")]




@pytest.mark.slow
def test_greedy_grpc_http_and_transformers_agree(engine, stub, reference_greedy) -> None:
    expected = reference_greedy["ids"]
    (grpc_complete,) = _completes(stub, _request("greedy-grpc", max_new_tokens=GREEDY_TOKENS))
    http = requests.post(
        engine["http"] + "/generate",
        json={"input_ids": GEMMA_PROMPT_IDS, "sampling_params": {"temperature": 0, "max_new_tokens": GREEDY_TOKENS}},
        timeout=120,
    ).json()
    assert list(grpc_complete.output_ids) == expected
    assert http["output_ids"] == expected
    assert grpc_complete.prompt_tokens == len(GEMMA_PROMPT_IDS)
    assert http["meta_info"]["prompt_tokens"] == len(GEMMA_PROMPT_IDS)


@pytest.mark.slow
def test_grpc_stream_chunks_add_up(stub, reference_greedy) -> None:
    responses = list(stub.Generate(_request("stream", stream=True, max_new_tokens=6), timeout=120))
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    completes = [r.complete for r in responses if r.HasField("complete")]
    assert len(completes) == 1
    streamed = [t for c in chunks for t in c.token_ids] + list(completes[0].output_ids)
    assert streamed == reference_greedy["ids"][:6]
    assert [c.completion_tokens for c in chunks] == list(range(1, len(chunks) + 1))
    assert completes[0].completion_tokens == 6
    assert completes[0].finish_reason == "length"


@pytest.mark.slow
def test_stop_token_id_ends_generation(stub, reference_greedy) -> None:
    stop_id = reference_greedy["ids"][2]
    (complete,) = _completes(stub, _request("stop-id", max_new_tokens=20, stop_token_ids=[stop_id]))
    assert list(complete.output_ids) == reference_greedy["ids"][:3]
    assert complete.finish_reason == "stop"
    assert complete.WhichOneof("matched_stop") == "matched_token_id"
    assert complete.matched_token_id == stop_id


@pytest.mark.slow
def test_model_eos_end_of_turn_stops(stub) -> None:
    # A large bias makes <end_of_turn> the first token; it is an EOS id of generation_config.json.
    (complete,) = _completes(stub, _request("eos", max_new_tokens=5, logit_bias={str(END_OF_TURN): 100.0}))
    assert list(complete.output_ids) == [END_OF_TURN]
    assert complete.finish_reason == "stop"
    assert complete.matched_token_id == END_OF_TURN


@pytest.mark.slow
def test_ignore_eos_runs_to_max_tokens(stub) -> None:
    (complete,) = _completes(
        stub, _request("ignore-eos", max_new_tokens=3, ignore_eos=True, logit_bias={str(END_OF_TURN): 100.0})
    )
    assert list(complete.output_ids) == [END_OF_TURN] * 3
    assert complete.finish_reason == "length"
    assert complete.WhichOneof("matched_stop") is None


@pytest.mark.slow
def test_min_new_tokens_masks_tokenizer_eos(stub) -> None:
    # sglang masks the request's stop ids and the tokenizer's eos (<eos> = 1) until min_new_tokens.
    (complete,) = _completes(stub, _request("min-tokens", max_new_tokens=4, min_new_tokens=2, logit_bias={"1": 100.0}))
    assert list(complete.output_ids)[0] != 1
    assert list(complete.output_ids)[-1] == 1
    assert complete.completion_tokens == 3


@pytest.mark.slow
def test_abort_ends_running_request(stub) -> None:
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    responses = stub.Generate(_request("to-abort", stream=True, max_new_tokens=400, ignore_eos=True), timeout=120)
    seen = 0
    final = None
    for response in responses:
        if response.HasField("chunk"):
            seen += 1
            if seen == 2:
                reply = stub.Abort(pb.AbortRequest(request_id="to-abort"))
                assert reply.success
        elif response.HasField("complete"):
            final = response.complete
    assert final is not None
    assert final.finish_reason == "abort"
    assert final.completion_tokens < 400


@pytest.mark.slow
def test_abort_unknown_request_fails(stub) -> None:
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    reply = stub.Abort(pb.AbortRequest(request_id="never-sent"))
    assert not reply.success


@pytest.mark.slow
def test_cancelled_call_aborts_request(engine, stub) -> None:
    responses = stub.Generate(_request("to-cancel", stream=True, max_new_tokens=400, ignore_eos=True), timeout=120)
    next(responses)
    responses.cancel()
    deadline = time.monotonic() + 20
    while "request to-cancel sample 0 finished: {'type': 'abort'" not in engine["log"].read_text():
        assert time.monotonic() < deadline, "the engine did not abort the cancelled request"
        time.sleep(0.2)


@pytest.mark.slow
def test_logprobs_match_transformers(stub, reference_greedy) -> None:
    (complete,) = _completes(
        stub, _request("logprobs", max_new_tokens=3, return_logprob=True, top_logprobs_num=3)
    )
    logprobs = complete.output_logprobs
    assert list(logprobs.token_ids) == list(complete.output_ids)
    assert len(logprobs.token_logprobs) == 3
    assert len(logprobs.top_logprobs) == 3
    first_top = logprobs.top_logprobs[0]
    assert first_top.token_ids[0] == complete.output_ids[0]
    assert list(first_top.values) == sorted(first_top.values, reverse=True)
    expected = float(reference_greedy["first_logprobs"][complete.output_ids[0]])
    assert logprobs.token_logprobs[0] == pytest.approx(expected, abs=1e-3)


@pytest.mark.slow
def test_n2_returns_two_indexed_samples(stub) -> None:
    completes = _completes(stub, _request("n2", max_new_tokens=4, temperature=0.8, n=2))
    assert sorted(c.index for c in completes) == [0, 1]
    assert all(c.completion_tokens == 4 for c in completes)
    assert all(c.prompt_tokens == len(GEMMA_PROMPT_IDS) for c in completes)


@pytest.mark.slow
def test_n2_stream_tags_chunks_by_index(stub) -> None:
    responses = list(stub.Generate(_request("n2-stream", stream=True, max_new_tokens=3, n=2), timeout=120))
    completes = [r.complete for r in responses if r.HasField("complete")]
    chunk_indexes = {r.chunk.index for r in responses if r.HasField("chunk")}
    assert sorted(c.index for c in completes) == [0, 1]
    assert chunk_indexes == {0, 1}


@pytest.mark.slow
def test_stop_string_matches_and_trims(engine, stub, reference_greedy) -> None:
    from transformers import AutoTokenizer

    from harness.fixture import build_fixture

    tokenizer = AutoTokenizer.from_pretrained(build_fixture())
    ids = reference_greedy["ids"]
    # The decoded text of the fourth greedy token, stripped, is a stop string the model reaches.
    stop = tokenizer.decode([ids[3]]).strip()
    assert stop
    (complete,) = _completes(stub, _request("stop-str", max_new_tokens=20, stop=[stop]))
    assert complete.finish_reason == "stop"
    assert complete.matched_stop_str == stop
    assert list(complete.output_ids) == ids[:4]

    body = {"input_ids": GEMMA_PROMPT_IDS, "sampling_params": {"temperature": 0, "max_new_tokens": 20, "stop": [stop]}}
    trimmed = requests.post(engine["http"] + "/generate", json=body, timeout=120).json()
    body["sampling_params"]["no_stop_trim"] = True
    kept = requests.post(engine["http"] + "/generate", json=body, timeout=120).json()
    assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert stop not in trimmed["text"]
    assert kept["text"].endswith(stop)


@pytest.mark.slow
def test_over_long_prompt_is_an_error(engine, stub) -> None:
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    from harness.engine.grpc_service import GenerateErrorResponse

    call = grpc.insecure_channel(engine["grpc"]).unary_stream(
        "/sglang.grpc.scheduler.SglangScheduler/Generate",
        request_serializer=pb.GenerateRequest.SerializeToString,
        response_deserializer=GenerateErrorResponse.FromString,
    )
    responses = list(call(_request("too-long", ids=[2] + [236881] * CONTEXT_LENGTH, max_new_tokens=4), timeout=60))
    assert len(responses) == 1
    assert responses[0].error.http_status_code == "400"
    assert "exceeds the maximum allowed length" in responses[0].error.message

    http = requests.post(
        engine["http"] + "/generate", json={"input_ids": [2] * (CONTEXT_LENGTH + 5)}, timeout=60
    )
    assert http.status_code == 400
    # The engine still serves after rejecting both.
    assert requests.get(engine["http"] + "/health_generate", timeout=60).status_code == 200


@pytest.mark.slow
def test_malformed_json_is_400(engine) -> None:
    response = requests.post(
        engine["http"] + "/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["message"]


@pytest.mark.slow
def test_unknown_model_is_404(engine) -> None:
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    response = requests.post(engine["http"] + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 404
    assert "no-such-model" in response.json()["message"]


@pytest.mark.slow
def test_chat_uses_template_and_reports_usage(engine, reference_greedy) -> None:
    body = {
        "model": "google/gemma-3-270m-it",
        "messages": [{"role": "user", "content": "Why sky is blue?"}],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    response = requests.post(engine["http"] + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200
    data = response.json()
    assert data["usage"]["prompt_tokens"] == len(GEMMA_PROMPT_IDS)
    assert data["usage"]["completion_tokens"] == 8
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["matched_stop"] is None
    assert len(choice["logprobs"]["content"]) == 8
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2

    from transformers import AutoTokenizer

    from harness.fixture import build_fixture

    tokenizer = AutoTokenizer.from_pretrained(build_fixture())
    assert choice["message"]["content"] == tokenizer.decode(reference_greedy["ids"][:8], skip_special_tokens=True)


@pytest.mark.slow
def test_chat_stream_matches_non_stream(engine) -> None:
    body = {"messages": [{"role": "user", "content": "Why sky is blue?"}], "max_tokens": 6, "temperature": 0}
    whole = requests.post(engine["http"] + "/v1/chat/completions", json=body, timeout=120).json()
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    lines = requests.post(engine["http"] + "/v1/chat/completions", json=body, timeout=120, stream=True).iter_lines()
    import json

    events = [line[len(b"data: ") :] for line in lines if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert text == whole["choices"][0]["message"]["content"]
    assert finish == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


@pytest.mark.slow
def test_model_info_reports_true_metadata(engine, stub) -> None:
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.vocab_size == 262144
    assert info.bos_token_id == 2
    assert list(info.eos_token_ids) == [1, 106]
    assert info.pad_token_id == 0
    assert info.max_context_length == CONTEXT_LENGTH
    assert info.max_req_input_len == CONTEXT_LENGTH - 1
    assert list(info.architectures) == ["Gemma3ForCausalLM"]
    assert info.model_type == "gemma3_text"
    assert info.served_model_name == "google/gemma-3-270m-it"
    assert stub.HealthCheck(pb.HealthCheckRequest()).healthy
    assert stub.GetServerInfo(pb.GetServerInfoRequest()).server_type == "grpc"

    http = requests.get(engine["http"] + "/model_info", timeout=30).json()
    assert http["vocab_size"] == 262144
    assert http["model_type"] == "gemma3_text"
    models = requests.get(engine["http"] + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["google/gemma-3-270m-it"]


@pytest.mark.slow
def test_newer_rpcs_are_unimplemented(engine) -> None:
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(engine["grpc"])
    with pytest.raises(grpc.RpcError) as raised:
        pb_grpc.SglangSchedulerStub(channel).GetLoads(pb.GetLoadsRequest(), timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    channel.close()


@pytest.mark.slow
def test_concurrent_requests_are_not_mixed(stub) -> None:
    prompts = {f"concurrent-{i}": GEMMA_PROMPT_IDS[:-4] + [GEMMA_PROMPT_IDS[4 + i]] + GEMMA_PROMPT_IDS[-3:] for i in range(4)}
    solo = {rid: list(_completes(stub, _request(rid + "-solo", ids=ids, max_new_tokens=6))[0].output_ids) for rid, ids in prompts.items()}
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(rid: str, ids: list[int]) -> None:
        try:
            (complete,) = _completes(stub, _request(rid, ids=ids, max_new_tokens=6))
            results[rid] = list(complete.output_ids)
        except BaseException as error:  # reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=run, args=item) for item in prompts.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    assert results == solo


@pytest.mark.slow
def test_sigterm_stops_engine_cleanly(model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    log_path = tmp_path / "engine.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "harness", "engine", "--model-dir", str(model_dir), "--http-port", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while "HTTP listener ready" not in log_path.read_text():
                assert process.poll() is None, log_path.read_text()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.5)
            process.terminate()
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "engine stopped" in log_path.read_text()


@pytest.mark.slow
def test_model_past_sliding_window_matches_transformers(model_dir: Path) -> None:
    """Prefill and decode beyond Gemma 3's 512-token sliding window agree with transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.engine.model import GemmaModel

    prompt = GEMMA_PROMPT_IDS[:4] + [11355, 7217, 563, 3730, 236881, 107] * 100 + GEMMA_PROMPT_IDS[-5:]
    assert len(prompt) > 600
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.eval()
    with torch.inference_mode():
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    expected = generated[0, len(prompt) :].tolist()
    del reference

    threads = torch.get_num_threads()
    try:
        model = GemmaModel(model_dir)  # sets torch to one thread for the whole process
        cache = model.new_cache(len(prompt) + 8)
        logits = model.forward(prompt, cache)
        ids = [int(logits.argmax())]
        while len(ids) < len(expected):
            ids.append(int(model.forward([ids[-1]], cache).argmax()))
    finally:
        torch.set_num_threads(threads)
    assert ids == expected
