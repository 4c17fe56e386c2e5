"""The tap: byte-exact forwarding, records of Generate calls, cancellation and deadlines."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from fake_scheduler import ECHO_METHOD, FakeScheduler, output_ids_for
from harness.stacks.process import free_port
from harness.stacks.waiting import PortOpen
from harness.tap import GENERATE_METHOD, Tap, read_calls, read_records

PROMPT = [2, 105, 2364, 107, 11355, 7217, 563, 3730, 236881, 106, 107, 105, 4368, 107]
# An unknown field (number 99) appended to a GenerateRequest: the stubs drop it when they
# re-serialize, so it only reaches the server if the tap forwards the bytes unchanged.
UNKNOWN_FIELD = bytes([0x9A, 0x06, 0x03]) + b"xyz"


def generate_request(request_id: str, stream: bool = True, prompt: list[int] | None = None) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        tokenized=pb.TokenizedInput(original_text="Why sky is blue?", input_ids=prompt or PROMPT),
        sampling_params=pb.SamplingParams(temperature=0.7, top_p=1.0, top_k=-1, max_new_tokens=512,
                                          stop_token_ids=[106], skip_special_tokens=True),
        stream=stream,
        return_logprob=True,
        top_logprobs_num=3,
    )


@pytest.fixture()
def fake():
    with FakeScheduler() as server:
        yield server


@pytest.fixture()
def tap(fake, tmp_path):
    with Tap("127.0.0.1:0", fake.address, tmp_path / "wire.jsonl") as running:
        yield running


def raw_generate(channel: grpc.Channel):
    return channel.unary_stream(GENERATE_METHOD)


def test_generate_bytes_forwarded_unchanged(fake, tap):
    request_bytes = generate_request("bytes-1").SerializeToString() + UNKNOWN_FIELD
    with grpc.insecure_channel(tap.address) as channel:
        received = list(raw_generate(channel)(request_bytes, timeout=10))

    assert fake.requests["bytes-1"] == request_bytes
    assert received == fake.responses["bytes-1"]
    assert len(received) == 5


def test_generate_record_fields(fake, tap, tmp_path):
    with grpc.insecure_channel(tap.address) as channel:
        list(raw_generate(channel)(generate_request("rec-1").SerializeToString(), timeout=10))

    records = tap.records_since(0)
    assert len(records) == 1
    record = records[0]
    assert record.request.request_id == "rec-1"
    assert record.request.prompt_ids == PROMPT
    assert record.request.original_text == "Why sky is blue?"
    assert record.request.stream is True
    assert record.request.return_logprob is True
    assert record.request.top_logprobs_num == 3
    params = record.request.sampling_params
    assert params["temperature"] == pytest.approx(0.7)
    assert params["max_new_tokens"] == 512
    assert params["stop_token_ids"] == [106]
    assert params["stream_interval"] is None
    assert params["min_p"] == 0
    assert "max_new_tokens" in record.request.sampling_params_set
    assert "stream_interval" not in record.request.sampling_params_set

    expected_ids = output_ids_for(PROMPT)
    assert [chunk["token_ids"] for chunk in record.chunks] == [[token_id] for token_id in expected_ids]
    assert [chunk["completion_tokens"] for chunk in record.chunks] == [1, 2, 3, 4]
    assert len(record.completions) == 1
    assert record.completions[0].finish_reason == "stop"
    assert record.completions[0].matched_stop == 106
    assert record.completions[0].prompt_tokens == len(PROMPT)
    assert record.status_code == "OK"
    assert record.error is None
    assert record.cancelled is False

    from_file = read_records(tmp_path / "wire.jsonl")
    assert from_file == records


def test_optional_zero_counts_as_set(fake, tap):
    request = generate_request("zero-1")
    request.sampling_params.max_new_tokens = 0
    with grpc.insecure_channel(tap.address) as channel:
        list(raw_generate(channel)(request.SerializeToString(), timeout=10))

    record = tap.records_since(0)[0]
    assert record.request.sampling_params["max_new_tokens"] == 0
    assert "max_new_tokens" in record.request.sampling_params_set


def test_generate_error_recorded(fake, tap):
    with grpc.insecure_channel(tap.address) as channel:
        received = list(raw_generate(channel)(generate_request("error-1").SerializeToString(), timeout=10))

    assert received == fake.responses["error-1"]
    record = tap.records_since(0)[0]
    assert record.error == "fake failure"
    assert record.error_http_status == "500"
    assert record.status_code == "OK"
    assert record.completions == []


def test_error_status_passed_back(fake, tap):
    with grpc.insecure_channel(tap.address) as channel:
        call = raw_generate(channel)(generate_request("status-1").SerializeToString(), timeout=10)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)

    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "fake invalid argument"
    record = tap.records_since(0)[0]
    assert record.status_code == "INVALID_ARGUMENT"
    assert len(record.chunks) == 1
    assert "fake invalid argument" in record.error


def test_metadata_both_ways(fake, tap):
    with grpc.insecure_channel(tap.address) as channel:
        call = raw_generate(channel)(generate_request("meta-1", stream=False).SerializeToString(),
                                     timeout=10, metadata=(("x-request-tag", "abc"),))
        list(call)
        initial = dict(call.initial_metadata())
        trailing = dict(call.trailing_metadata())

    assert fake.metadata["meta-1"]["x-request-tag"] == "abc"
    assert initial["x-fake-initial"] == "meta-1"
    assert trailing["x-fake-trailing"] == "done"


def test_deadline_propagates(fake, tap):
    with grpc.insecure_channel(tap.address) as channel:
        call = raw_generate(channel)(generate_request("slow-deadline").SerializeToString(), timeout=0.5)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)

    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server saw the client's deadline, less what the hop cost. gRPC sends deadlines as
    # timeouts in whole time units, so rounding can add up to a few milliseconds.
    assert 0 < fake.time_remaining["slow-deadline"] <= 0.51
    assert fake.cancelled["slow-deadline"].wait(5)
    record = tap.records_since(0, wait_s=5)[0]
    assert record.status_code in ("DEADLINE_EXCEEDED", "CANCELLED")


def test_client_cancel_reaches_server(fake, tap):
    with grpc.insecure_channel(tap.address) as channel:
        call = raw_generate(channel)(generate_request("slow-cancel").SerializeToString())
        first = next(call)
        call.cancel()

    assert pb.GenerateResponse.FromString(first).chunk.token_ids == [1000]
    assert fake.cancelled["slow-cancel"].wait(5), "the server call was not cancelled"
    sent_before_cancel = len(fake.responses["slow-cancel"])
    time.sleep(0.3)
    assert len(fake.responses["slow-cancel"]) == sent_before_cancel
    assert sent_before_cancel < 200
    record = tap.records_since(0, wait_s=5)[0]
    assert record.cancelled is True
    assert record.status_code == "CANCELLED"


def test_unknown_method_forwarded(fake, tap, tmp_path):
    with grpc.insecure_channel(tap.address) as channel:
        reply = channel.unary_unary(ECHO_METHOD)(b"\x01\x02abc", timeout=10)

    assert reply == b"cba\x02\x01"
    calls = read_calls(tmp_path / "wire.jsonl")
    assert [call["method"] for call in calls] == [ECHO_METHOD]
    assert calls[0]["status_code"] == "OK"
    assert calls[0]["request_bytes"] == 5
    assert tap.record_count == 0


def test_unary_scheduler_calls_listed(fake, tap):
    with grpc.insecure_channel(tap.address) as channel:
        health = channel.unary_unary(f"/{pb.DESCRIPTOR.package}.SglangScheduler/HealthCheck")(
            pb.HealthCheckRequest().SerializeToString(), timeout=10)
        info = channel.unary_unary(f"/{pb.DESCRIPTOR.package}.SglangScheduler/GetModelInfo")(
            pb.GetModelInfoRequest().SerializeToString(), timeout=10)

    assert pb.HealthCheckResponse.FromString(health).healthy is True
    assert pb.GetModelInfoResponse.FromString(info).vocab_size == 262144
    methods = [call["method"].rsplit("/", 1)[1] for call in tap.calls()]
    assert methods == ["HealthCheck", "GetModelInfo"]


def test_upstream_down_gives_unavailable(tmp_path):
    port = free_port()
    with Tap("127.0.0.1:0", f"127.0.0.1:{port}", tmp_path / "wire.jsonl") as tap:
        with grpc.insecure_channel(tap.address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                list(raw_generate(channel)(generate_request("down-1").SerializeToString(), timeout=5))
        records = tap.records_since(0)

    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert records[0].status_code == "UNAVAILABLE"
    assert records[0].request.request_id == "down-1"


def test_concurrent_streams_no_crosstalk(fake, tap):
    count = 32
    prompts = {f"conc-{index}": [2, 105, 1000 + index, 106, 107, 105, 4368, 107] for index in range(count)}
    start = threading.Barrier(count)

    def run(request_id: str) -> list[bytes]:
        with grpc.insecure_channel(tap.address) as channel:
            request = generate_request(request_id, prompt=prompts[request_id]).SerializeToString()
            start.wait()
            return list(raw_generate(channel)(request, timeout=30))

    with futures.ThreadPoolExecutor(max_workers=count) as pool:
        received = dict(zip(prompts, pool.map(run, prompts)))

    records = {record.request.request_id: record for record in tap.records_since(0, wait_s=5)}
    assert sorted(records) == sorted(prompts)
    for request_id, prompt in prompts.items():
        record = records[request_id]
        assert record.request.prompt_ids == prompt
        streamed = [chunk["token_ids"][0] for chunk in record.chunks]
        assert streamed == output_ids_for(prompt), request_id
        assert received[request_id] == fake.responses[request_id], request_id


def test_record_file_one_line_per_call(fake, tap, tmp_path):
    with grpc.insecure_channel(tap.address) as channel:
        for index in range(3):
            list(raw_generate(channel)(generate_request(f"line-{index}").SerializeToString(), timeout=10))
        channel.unary_unary(ECHO_METHOD)(b"x", timeout=10)

    lines = (tmp_path / "wire.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds == ["generate", "generate", "generate", "call"]


def test_cli_records_and_stops_on_sigterm(fake, tmp_path):
    port = free_port()
    record_path = tmp_path / "cli.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "harness", "tap", "--listen", f"127.0.0.1:{port}",
         "--upstream", fake.address, "--record", str(record_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        PortOpen("127.0.0.1", port, component="tap").wait(None, timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            list(raw_generate(channel)(generate_request("cli-1").SerializeToString(), timeout=10))
        process.terminate()
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0
    assert "tap listening on" in output
    assert [record.request.request_id for record in read_records(record_path)] == ["cli-1"]


def test_cli_bad_listen_address(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "harness", "tap", "--listen", "256.0.0.1:1", "--upstream", "127.0.0.1:1",
         "--record", str(tmp_path / "x.jsonl")],
        capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert "tap cannot listen on 256.0.0.1:1" in result.stderr
