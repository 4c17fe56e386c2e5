"""``python -m harness engine``: serve one model over sglang's gRPC and HTTP APIs on the CPU.

One model instance and one scheduler serve both listeners. Each listener logs
"gRPC listener ready on HOST:PORT" or "HTTP listener ready on HOST:PORT" once it accepts
connections (the stacks wait for these lines). SIGTERM and SIGINT stop both listeners and
the scheduler, then the process exits 0. Invalid flags or an unusable model folder print
one error line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("harness.engine")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"error: {message}; run 'python -m harness engine --help'", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="python -m harness engine", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="HF-format model folder")
    parser.add_argument("--grpc-port", type=int, help="port of the SglangScheduler gRPC listener (omit for none)")
    parser.add_argument("--http-port", type=int, help="port of the HTTP listener (omit for none)")
    parser.add_argument("--host", default="127.0.0.1", help="address both listeners bind (default 127.0.0.1)")
    parser.add_argument("--served-model-name", help="model name reported to clients (default: config.json _name_or_path)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weight dtype (default float32)")
    parser.add_argument("--context-length", type=int, help="max tokens per sequence (default: max_position_embeddings)")
    parser.add_argument("--threads", type=int, default=None, help="threads that compute the output head; torch itself runs single-threaded (default: CPU count)")
    parser.add_argument("--log-level", default="INFO", help="logging level; DEBUG logs every request's prompt ids")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.grpc_port is None and args.http_port is None:
        parser.error("pass --grpc-port, --http-port or both")
    for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port)):
        if port is not None and not 0 < port < 65536:
            parser.error(f"{flag} {port} is not a port number in 1..65535")
    if args.grpc_port is not None and args.grpc_port == args.http_port:
        parser.error(f"--grpc-port and --http-port are both {args.grpc_port}; use two ports")
    if args.context_length is not None and args.context_length < 2:
        parser.error(f"--context-length {args.context_length} must be at least 2")
    model_dir: Path = args.model_dir
    if not model_dir.is_dir():
        parser.error(f"--model-dir {model_dir} is not a folder")
    for name in ("config.json", "tokenizer_config.json"):
        if not (model_dir / name).is_file():
            parser.error(f"--model-dir {model_dir} has no {name}")
    if not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin")):
        parser.error(f"--model-dir {model_dir} has no *.safetensors or *.bin weights")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.error(f"--log-level {args.log_level} is not a logging level")
    logging.getLogger().setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Ask torch's CPU allocator for transparent huge pages (madvise) on large tensors: with
    # 4 KiB pages the output head read at about 20 GB/s, with huge pages at about 30 GB/s
    # (benchmarks/engine_decode.py, 2-core AMD EPYC, THP mode "madvise"). torch reads the
    # variable at its first allocation, so it is set before torch is imported.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from transformers import AutoTokenizer

    from harness.engine.grpc_service import SchedulerServicer, start_grpc_server
    from harness.engine.http_api import HttpApi, start_http_server
    from harness.engine.model import GemmaModel, ModelLoadError, read_metadata
    from harness.engine.scheduler import Scheduler

    model_dir = args.model_dir.resolve()
    try:
        metadata = read_metadata(model_dir, args.served_model_name, args.context_length)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        metadata.tokenizer_eos_token_id = tokenizer.eos_token_id
        model = GemmaModel(model_dir, args.dtype, args.threads)
    except (ModelLoadError, OSError, ValueError) as error:
        print(f"error: cannot load --model-dir {model_dir}: {error}", file=sys.stderr)
        return 2
    generation_path = model_dir / "generation_config.json"
    generation_defaults = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    log.info(
        "model loaded: %s (%s, %s), vocab %d, eos %s, context %d",
        metadata.served_model_name,
        metadata.model_type,
        args.dtype,
        metadata.vocab_size,
        metadata.eos_token_ids,
        metadata.max_context_length,
    )

    scheduler = Scheduler(model, metadata, tokenizer)
    scheduler.start()
    server_args = {
        "model_path": str(model_dir),
        "tokenizer_path": str(model_dir),
        "served_model_name": metadata.served_model_name,
        "host": args.host,
        "port": args.http_port or 0,
        "grpc_port": args.grpc_port or 0,
        "dtype": args.dtype,
        "context_length": metadata.max_context_length,
        "device": "cpu",
        "skip_tokenizer_init": False,
        "stream_interval": 1,
    }

    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    grpc_server = None
    http_server = None
    servicer = None
    try:
        if args.grpc_port is not None:
            servicer = SchedulerServicer(scheduler, server_args)
            grpc_server = start_grpc_server(servicer, args.host, args.grpc_port)
            log.info("gRPC listener ready on %s:%d", args.host, args.grpc_port)
        if args.http_port is not None:
            api = HttpApi(scheduler, tokenizer, server_args, generation_defaults)
            http_server, _ = start_http_server(api, args.host, args.http_port)
            log.info("HTTP listener ready on %s:%d", args.host, args.http_port)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        _shutdown(grpc_server, http_server, servicer, scheduler)
        return 2

    stop_requested.wait()
    _shutdown(grpc_server, http_server, servicer, scheduler)
    log.info("engine stopped")
    return 0


def _shutdown(grpc_server, http_server, servicer, scheduler) -> None:
    if servicer is not None:
        servicer.shutting_down = True
    if http_server is not None:
        http_server.shutdown()
        http_server.server_close()
    if grpc_server is not None:
        grpc_server.stop(grace=2).wait(5)
    scheduler.shutdown()
