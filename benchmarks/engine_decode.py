"""Measure the engine's decode speed against the memory-bandwidth floor and transformers.

One run measures, on the same prompt and token count:

1. read bandwidth, with 4 KiB pages and with transparent huge pages, each the higher of
   two reads of a 1 GiB float32 tensor: torch's sum with its default threads, and the same
   read split over one Python thread per core (torch single-threaded), best of 5 passes;
2. the floors they imply: bandwidth / bytes of weights read per decoded token (every
   weight once, and the tied embedding once, as the output head);
3. transformers ``generate`` (greedy, fixed token count) in the chosen dtype;
4. the engine started as a subprocess and called through gRPC (streaming), decode rate
   measured from the first streamed token to the last, so the prefill is excluded.

Like the engine, this process sets torch's allocator to request transparent huge pages
(THP_MEM_ALLOC_ENABLE=1) unless the variable is already set, so transformers and the
engine run with the same page size.

Usage: ``python benchmarks/engine_decode.py [--model-dir DIR] [--tokens 64] [--dtype float32]``
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402 (after the allocator setting)

PROMPT_IDS = [2, 105, 2364, 107, 11355, 7217, 563, 3730, 236881, 106, 107, 105, 4368, 107]


def measure_bandwidth(split_threads: int = 0, passes: int = 5) -> float:
    """Return bytes per second of the fastest full read of a 1 GiB float32 tensor.

    With ``split_threads`` > 1 the tensor is read in that many parts by as many Python
    threads, torch single-threaded, which is how the engine reads its output head.
    """
    from concurrent.futures import ThreadPoolExecutor

    data = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    default_threads = torch.get_num_threads()
    best = float("inf")
    if split_threads > 1:
        torch.set_num_threads(1)
        parts = data.chunk(split_threads)
        with ThreadPoolExecutor(split_threads) as pool:
            for _ in range(passes):
                start = time.perf_counter()
                list(pool.map(torch.sum, parts))
                best = min(best, time.perf_counter() - start)
        torch.set_num_threads(default_threads)
    else:
        for _ in range(passes):
            start = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best


def bandwidth_in_subprocess(thp: bool) -> float:
    """Return the higher of the two bandwidths, measured in a fresh process with or without huge pages.

    torch reads THP_MEM_ALLOC_ENABLE once per process, so each page size needs its own process.
    """
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if thp else "0")
    result = subprocess.run(
        [sys.executable, __file__, "--bandwidth-only"], env=env, capture_output=True, text=True, check=True, timeout=300
    )
    return float(result.stdout.strip().splitlines()[-1])


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of distinct weights (tied tensors counted once) a decode step reads."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    return total


def measure_transformers(model_dir: Path, dtype: torch.dtype, tokens: int) -> tuple[float, list[int], int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    weight_bytes = weight_bytes_per_token(model)
    prompt = torch.tensor([PROMPT_IDS])
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        output = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        elapsed = time.perf_counter() - start
    ids = output[0, len(PROMPT_IDS) :].tolist()
    del model
    return len(ids) / elapsed, ids, weight_bytes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure_engine(model_dir: Path, dtype: str, tokens: int, log_path: Path) -> tuple[float, list[int]]:
    """Start the engine, stream one greedy request through gRPC and return (decode tok/s, ids)."""
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

    port = _free_port()
    command = [sys.executable, "-m", "harness", "engine", "--model-dir", str(model_dir)]
    command += ["--grpc-port", str(port), "--dtype", dtype]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "gRPC listener ready" not in log_path.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"engine did not start; see {log_path}")
                time.sleep(0.5)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            stub = pb_grpc.SglangSchedulerStub(channel)

            def run(request_id: str, count: int) -> tuple[list[int], list[float]]:
                request = pb.GenerateRequest(
                    request_id=request_id,
                    tokenized=pb.TokenizedInput(input_ids=PROMPT_IDS),
                    sampling_params=pb.SamplingParams(
                        temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=count, ignore_eos=True
                    ),
                    stream=True,
                )
                ids: list[int] = []
                stamps: list[float] = []
                for response in stub.Generate(request, timeout=600):
                    part = response.chunk.token_ids if response.HasField("chunk") else response.complete.output_ids
                    ids.extend(part)
                    stamps.extend([time.perf_counter()] * len(part))
                return ids, stamps

            run("warm-up", 4)
            ids, stamps = run("benchmark", tokens)
            channel.close()
        finally:
            process.terminate()
            process.wait(timeout=60)
    return (len(ids) - 1) / (stamps[-1] - stamps[0]), ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="HF-format model folder (default: the harness fixture)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to decode per measurement (default 64)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype")
    parser.add_argument("--log", type=Path, default=Path("/tmp/engine_decode_engine.log"), help="engine log file")
    parser.add_argument("--bandwidth-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bandwidth_only:
        print(max(measure_bandwidth(), measure_bandwidth(split_threads=os.cpu_count() or 1)))
        return 0

    if args.model_dir is None:
        from harness.fixture import build_fixture

        args.model_dir = build_fixture()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    cores = os.cpu_count() or 1
    small_pages = bandwidth_in_subprocess(thp=False)
    huge_pages = bandwidth_in_subprocess(thp=True)
    hf_rate, hf_ids, weight_bytes = measure_transformers(args.model_dir, dtype, args.tokens)
    engine_rate, engine_ids = measure_engine(args.model_dir, args.dtype, args.tokens, args.log)
    same = engine_ids == hf_ids
    small_floor = small_pages / weight_bytes
    huge_floor = huge_pages / weight_bytes

    print(f"model: {args.model_dir} ({args.dtype}), {weight_bytes / 1e9:.2f} GB of weights read per token")
    print(f"cores: {cores}, tokens: {args.tokens}, prompt: {len(PROMPT_IDS)} ids")
    print(f"transformers and the engine ran with THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}")
    print()
    rows = [
        ("read bandwidth, 4 KiB pages", f"{small_pages / 1e9:.1f} GB/s", "", ""),
        ("read bandwidth, huge pages", f"{huge_pages / 1e9:.1f} GB/s", "", ""),
        ("floor, 4 KiB pages", f"{small_floor:.1f} tok/s", "1.00", f"{small_floor / huge_floor:.2f}"),
        ("floor, huge pages", f"{huge_floor:.1f} tok/s", f"{huge_floor / small_floor:.2f}", "1.00"),
        ("transformers generate", f"{hf_rate:.1f} tok/s", f"{hf_rate / small_floor:.2f}", f"{hf_rate / huge_floor:.2f}"),
        (
            "engine through gRPC (decode only)",
            f"{engine_rate:.1f} tok/s",
            f"{engine_rate / small_floor:.2f}",
            f"{engine_rate / huge_floor:.2f}",
        ),
    ]
    print(f"| {'measurement':<34} | {'value':>11} | {'x floor 4K':>10} | {'x floor huge':>12} |")
    print(f"|{'-' * 36}|{'-' * 13}|{'-' * 12}|{'-' * 14}|")
    for name, value, ratio_small, ratio_huge in rows:
        print(f"| {name:<34} | {value:>11} | {ratio_small:>10} | {ratio_huge:>12} |")
    print()
    print(f"engine / transformers: {engine_rate / hf_rate:.2f}x; greedy ids identical: {same}")
    return 0 if same or args.dtype != "float32" else 1


if __name__ == "__main__":
    sys.exit(main())
