"""Checkpoints quantized for inference (GGUF) turned into float model folders that training accepts.

A GGUF file (llama.cpp's format: SmolLM2, Llama, Qwen, Mistral, ... as Q4/Q8/F16) loads in
transformers with ``from_pretrained(folder, gguf_file=...)``, which de-quantizes every tensor; but
the loaded model still carries a GGUF quantization config, so ``save_pretrained`` refuses it and HF
Trainer refuses to train it. ``dequantize_gguf`` does the load once and writes a plain float folder
(``config.json`` without the quantization config, ``model.safetensors``, the tokenizer when the file
holds one) that ``AutoModelForCausalLM.from_pretrained(folder)`` loads like any checkpoint.

Tied embeddings: a GGUF file without ``output.weight`` has its ``lm_head`` tied to the token
embeddings (transformers sets ``tie_word_embeddings``); the folder keeps the tie (the head is not
stored twice, as ``save_pretrained`` does for every tied model).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Union

import torch

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "dequantized_from.json"  # written into the folder: which GGUF file it came from
Dtype = Literal["float32", "bfloat16", "float16"]


def dequantize_gguf(
    gguf_file: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    dtype: Dtype = "float32",
    tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """De-quantize ``gguf_file`` into the float model folder ``out_dir`` and return ``out_dir``.

    The folder appears complete or not at all: it is written under a temporary name beside
    ``out_dir`` and renamed into place. An existing folder made from the same file (same name and
    size, recorded in ``dequantized_from.json``) is returned as it is, so calling this again is
    cheap; ``overwrite=True`` rebuilds it.

    Args:
        gguf_file: path of the ``.gguf`` file.
        out_dir: the folder to write (its parent is created).
        dtype: the float type of the saved weights (``"float32"`` keeps every de-quantized value).
        tokenizer: also save the tokenizer stored in the file (skipped when the file holds none).
        overwrite: replace an existing ``out_dir``.

    Raises:
        FileNotFoundError: ``gguf_file`` does not exist.
        ValueError: ``gguf_file`` is not a GGUF file, or ``out_dir`` exists and holds something else.
        ImportError: the ``gguf`` package (which transformers reads GGUF with) is missing.
    """
    source, out_dir = Path(gguf_file), Path(out_dir)
    check_gguf_file(source)
    stamp = {"gguf_file": source.name, "size": source.stat().st_size, "dtype": dtype}
    if out_dir.exists() and not overwrite:
        if _stamp_of(out_dir) == stamp:
            return out_dir
        raise ValueError(
            f"{out_dir} exists and is not a de-quantized copy of {source.name} ({dtype}); pass overwrite=True to "
            "replace it, or choose another out_dir."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=getattr(torch, dtype))
    # The tensors are plain floats now; only the GGUF markers make save_pretrained refuse the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer and _has_tokenizer(source):
            AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(stamp, indent=1))
    return out_dir


def check_gguf_file(path: Path) -> None:
    """Raise a clear error unless ``path`` is a readable GGUF file and the ``gguf`` package is installed."""
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}: pass the path of a .gguf file.")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}). For a safetensors or "
            "PyTorch checkpoint folder, load it with `from_pretrained(folder)` directly."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {path.name} needs the `gguf` package: `pip install gguf`.")


def _has_tokenizer(path: Path) -> bool:
    from gguf import GGUFReader

    return "tokenizer.ggml.model" in GGUFReader(str(path)).fields


def _stamp_of(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success it replaces ``folder``, else it is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    old = folder.parent / f"{tmp.name}-old"
    try:
        yield tmp
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
