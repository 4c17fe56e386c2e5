"""Command line: ``python -m harness COMMAND``.

Each command lives in the module of its concern; this file only dispatches, so importing it
loads neither torch nor grpc. Exit codes: 0 success, 1 findings or invalid cases, 2 usage or
environment errors.
"""

from __future__ import annotations

import importlib
import logging
import sys

# command -> (module, function taking argv and returning an exit code, help line)
COMMANDS = {
    "run": ("harness.run", "main", "replay cases on a stack and report the findings"),
    "matrix": ("harness.matrix", "main_matrix", "run cases once per router release and tabulate the findings"),
    "bisect": ("harness.matrix", "main_bisect", "find the router release where a finding appears or goes away"),
    "validate": ("harness.cases", "main_validate", "check case files and report every error"),
    "fixture": ("harness.fixture", "main", "build the Gemma 3 fixture folder (fixture build)"),
    "engine": ("harness.engine.server", "main", "serve a model over sglang's gRPC and HTTP APIs on the CPU"),
    "tap": ("harness.tap", "main", "record the gRPC traffic between a router and a server"),
}


def usage() -> str:
    lines = ["usage: python -m harness COMMAND [ARGS]", "", "commands:"]
    for name, (_, _, help_line) in COMMANDS.items():
        lines.append(f"  {name:<10} {help_line}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; run 'python -m harness --help'", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, function_name, _ = COMMANDS[command]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)
