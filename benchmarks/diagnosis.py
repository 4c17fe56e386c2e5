"""Measure time to diagnosis: how long ``pytest -k gemma`` takes, cold and warm, and where it goes.

Each run is ``python -m pytest -k KEYWORD --reports-dir DIR`` from the repository root, timed
from the outside. The session writes ``timings.json`` (stack start, each case, stack stop,
report) into its run folder, and the engine logs queue, prefill and decode time for every
request it finishes. From these the script prints:

- the wall time of the whole command (Python start-up and collection included);
- stack start (fixture build included on a cold run), the sum of the cases, stop, report;
- harness overhead: the cases' wall time against the engine's own time (queue + prefill +
  decode) for the requests it served after the stack was ready. The cases' time also holds
  the reference (chat template and tokenizer, loaded once on the first case), the routers'
  own work and the diff.

Cold: a temporary HARNESS_CACHE_DIR, so the Gemma fixture is built from the GGUF package
again. Its ``routers`` and ``tiktoken`` folders link to the normal cache, so router venvs
are reused (installing a router release is a one-time download, not part of diagnosis).
Warm: the normal cache, with the fixture already built.

Usage: ``.venv/bin/python benchmarks/diagnosis.py [--keyword gemma] [--skip-cold] [--runs 1]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from harness.fixture import cache_root  # noqa: E402 (after the path setup)

# "2026-12-04 20:42:26,647 INFO harness.engine.scheduler: request ID sample 0 finished: {...} after N tokens
# (queued 0.000 s, prefill 0.138 s, decode 0.003 s)"
ENGINE_FINISH = re.compile(
    r"^(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* finished: .* after (?P<tokens>\d+) tokens "
    r"\(queued (?P<queued>[\d.]+) s, prefill (?P<prefill>[\d.]+) s, decode (?P<decode>[\d.]+) s\)")


def run_once(keyword: str, env: dict[str, str], reports_dir: Path) -> dict:
    """Run pytest once and return the measured numbers."""
    argv = [sys.executable, "-m", "pytest", "-k", keyword, f"--reports-dir={reports_dir}",
            "-p", "no:cacheprovider", "-q"]
    started = time.monotonic()
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall_s = time.monotonic() - started
    run_dirs = sorted(path for path in reports_dir.iterdir() if (path / "timings.json").is_file())
    if not run_dirs:
        raise SystemExit(f"error: pytest wrote no timings.json under {reports_dir} (exit code {result.returncode}):\n"
                         f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    run_dir = run_dirs[-1]
    timings = json.loads((run_dir / "timings.json").read_text())
    engine = engine_times(run_dir / "logs" / "engine.log", timings.get("stack_ready_at") or 0.0)
    return {"exit_code": result.returncode, "wall_s": wall_s, "timings": timings, "engine": engine,
            "run_dir": str(run_dir)}


def engine_times(log_path: Path, after: float) -> dict:
    """Sum the engine's per-request times for requests that finished after the Unix time ``after``."""
    totals = {"requests": 0, "tokens": 0, "queued_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
    for line in log_path.read_text(errors="replace").splitlines():
        match = ENGINE_FINISH.match(line)
        if match is None:
            continue
        stamp = datetime.datetime.strptime(match["stamp"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp < after:
            continue
        totals["requests"] += 1
        totals["tokens"] += int(match["tokens"])
        for key in ("queued", "prefill", "decode"):
            totals[f"{key}_s"] += float(match[key])
    return totals


def print_run(label: str, measured: dict) -> None:
    timings = measured["timings"]
    engine = measured["engine"]
    cases_s = sum(timings["cases"].values())
    engine_s = engine["queued_s"] + engine["prefill_s"] + engine["decode_s"]
    print(f"\n{label}: pytest exit code {measured['exit_code']}, run folder {measured['run_dir']}")
    print(f"| {'step':<34} | {'seconds':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|")
    rows = [
        ("whole command (wall)", measured["wall_s"]),
        ("stack start", timings["stack_start_s"]),
        (f"cases ({len(timings['cases'])})", cases_s),
        *((f"  {case_id}", seconds) for case_id, seconds in timings["cases"].items()),
        ("stack stop", timings["stack_stop_s"]),
        ("report", timings["report_s"]),
        (f"engine: {engine['requests']} requests, {engine['tokens']} tokens", engine_s),
        ("  of which prefill", engine["prefill_s"]),
        ("  of which decode", engine["decode_s"]),
    ]
    for name, seconds in rows:
        print(f"| {name:<34} | {seconds if seconds is not None else float('nan'):8.1f} |")
    if engine_s > 0:
        print(f"harness overhead: cases / engine time = {cases_s / engine_s:.2f}x")


def cold_env(temporary: Path) -> dict[str, str]:
    real = cache_root()
    for name in ("routers", "tiktoken"):
        (real / name).mkdir(parents=True, exist_ok=True)
        (temporary / name).symlink_to(real / name)
    env = dict(os.environ)
    env["HARNESS_CACHE_DIR"] = str(temporary)
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keyword", default="gemma", help="the -k expression passed to pytest (default: gemma)")
    parser.add_argument("--skip-cold", action="store_true", help="measure only warm runs")
    parser.add_argument("--runs", type=int, default=1, help="warm runs to measure (default: 1)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = parser.parse_args()

    measurements = []
    with tempfile.TemporaryDirectory(prefix="diagnosis-bench.") as scratch:
        scratch_dir = Path(scratch)
        if not args.skip_cold:
            cache = scratch_dir / "cache"
            cache.mkdir()
            reports = scratch_dir / "reports-cold"
            reports.mkdir()
            measured = run_once(args.keyword, cold_env(cache), reports)
            print_run("cold (fixture built, router venvs reused)", measured)
            measurements.append({"kind": "cold", **measured})
        env = dict(os.environ)
        env.pop("HARNESS_CACHE_DIR", None)
        for number in range(args.runs):
            reports = scratch_dir / f"reports-warm-{number}"
            reports.mkdir()
            measured = run_once(args.keyword, env, reports)
            print_run(f"warm run {number + 1}", measured)
            measurements.append({"kind": "warm", **measured})
    if args.json:
        args.json.write_text(json.dumps(measurements, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
