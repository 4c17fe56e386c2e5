"""Measure the latency the tap adds to each streamed Generate chunk.

A fake scheduler in this process streams chunks at a fixed interval. Each chunk carries the
``time.perf_counter_ns()`` of its send in ``request_id``. A client in this process reads
the stream once directly and once through the tap, which runs as its own process
(``python -m harness tap``) as it does in the CPU stack. Per chunk the latency is the
receive time minus the send time. The script prints p50 and p99 for both paths and their
difference.

Run: ``.venv/bin/python benchmarks/tap_latency.py [--calls 20] [--chunks 100] [--interval-ms 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from harness.stacks.process import ManagedProcess, free_port
from harness.stacks.waiting import PortOpen
from harness.tap import GENERATE_METHOD, read_records


def start_fake_scheduler(chunks: int, interval_s: float) -> tuple[grpc.Server, str]:
    def generate(request: bytes, context: grpc.ServicerContext):
        for step in range(chunks):
            response = pb.GenerateResponse(
                request_id=str(time.perf_counter_ns()),
                chunk=pb.GenerateStreamChunk(token_ids=[1000 + step], prompt_tokens=14, completion_tokens=step + 1),
            )
            yield response.SerializeToString()
            time.sleep(interval_s)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "sglang.grpc.scheduler.SglangScheduler", {"Generate": grpc.unary_stream_rpc_method_handler(generate)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def measure(address: str, calls: int) -> list[float]:
    """Return the per-chunk latencies in milliseconds over ``calls`` Generate calls."""
    request = pb.GenerateRequest(
        request_id="bench", tokenized=pb.TokenizedInput(input_ids=[2, 105, 2364, 107]), stream=True,
    ).SerializeToString()
    latencies = []
    with grpc.insecure_channel(address) as channel:
        generate = channel.unary_stream(GENERATE_METHOD)
        list(generate(request, timeout=30))  # warm up the connection
        for _ in range(calls):
            for data in generate(request, timeout=60):
                received = time.perf_counter_ns()
                sent = int(pb.GenerateResponse.FromString(data).request_id)
                latencies.append((received - sent) / 1e6)
    return latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="Generate calls per path")
    parser.add_argument("--chunks", type=int, default=100, help="chunks streamed per call")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="time between two chunks, in ms")
    args = parser.parse_args(argv)

    server, upstream = start_fake_scheduler(args.chunks, args.interval_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="tap-bench.") as scratch:
        tap_port = free_port()
        record_path = Path(scratch) / "wire.jsonl"
        argv_tap = [sys.executable, "-m", "harness", "tap", "--listen", f"127.0.0.1:{tap_port}",
                    "--upstream", upstream, "--record", str(record_path)]
        try:
            with ManagedProcess("tap", argv_tap, None, Path(scratch) / "tap.log") as tap:
                PortOpen("127.0.0.1", tap_port, component="tap").wait(tap, 30)
                direct = measure(upstream, args.calls)
                tapped = measure(f"127.0.0.1:{tap_port}", args.calls)
                direct_again = measure(upstream, args.calls)
            recorded = len(read_records(record_path))
        finally:
            server.stop(0)

    direct_all = direct + direct_again
    print(f"{args.calls} calls x {args.chunks} chunks per path, one chunk every {args.interval_ms} ms; "
          f"tap recorded {recorded} calls")
    print(f"{'path':<8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, values in (("direct", direct_all), ("tap", tapped)):
        print(f"{name:<8} {percentile(values, 0.5):8.3f} {percentile(values, 0.99):8.3f} "
              f"{statistics.fmean(values):8.3f}")
    print(f"added by the tap: p50 {percentile(tapped, 0.5) - percentile(direct_all, 0.5):.3f} ms, "
          f"p99 {percentile(tapped, 0.99) - percentile(direct_all, 0.99):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
