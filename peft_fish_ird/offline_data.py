"""Real labelled text that works offline: sentiment sets shipped inside PyPI packages.

* Pang & Lee movie-review sentences and tweets, human-rated by Hutto & Gilbert (ICWSM 2014,
  "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text"), shipped in
  the vaderSentiment 3.3.2 source distribution as ``additional_resources/hutto_ICWSM_2014.tar.gz``
  (lines ``id<TAB>mean valence<TAB>text``). Label: valence > 0 positive, < 0 negative; exact zeros
  are dropped. Movie sentences: an SST-2-like binary task.

The sdist is fetched once with ``pip download`` (PyPI is reachable where the hub is not) into a
cache folder (``$PEFT_FISH_IRD_CACHE`` or ``~/.cache/peft_fish_ird``), written atomically.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
HUTTO_FILES = {
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int


def cache_dir() -> Path:
    return Path(os.environ.get("PEFT_FISH_IRD_CACHE", Path.home() / ".cache" / "peft_fish_ird"))


def vader_sdist(directory: Optional[Path] = None) -> Path:
    """Path of the vaderSentiment 3.3.2 sdist, downloading it with pip on first use."""
    directory = Path(directory or cache_dir())
    target = directory / VADER_SDIST
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "vadersentiment==3.3.2", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / VADER_SDIST
        if done.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"Could not download the vaderSentiment 3.3.2 sdist with `{' '.join(cmd)}` (PyPI needed once):\n"
                f"{done.stderr[-2000:]}\nDownload it by hand and put {VADER_SDIST} in {directory}."
            )
        shutil.move(str(got), target)  # same file system: atomic rename
    return target


def load_hutto(name: str = "movie", directory: Optional[Path] = None) -> list[LabelledText]:
    """Sentences of one Hutto & Gilbert ground-truth file with binary labels (zeros dropped)."""
    if name not in HUTTO_FILES:
        raise ValueError(f"Unknown set {name!r}; choose one of {sorted(HUTTO_FILES)}.")
    with tarfile.open(vader_sdist(directory)) as outer:
        inner_bytes = outer.extractfile(VADER_MEMBER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(HUTTO_FILES[name]).read().decode("utf-8", errors="replace")
    rows = []
    for line in raw.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        valence = float(parts[1])
        if valence == 0:
            continue
        rows.append(LabelledText(parts[2].strip(), int(valence > 0)))
    return rows


def split(rows: list[LabelledText], sizes: dict[str, int], seed: int = 0) -> dict[str, list[LabelledText]]:
    """Disjoint splits of the given sizes from one seeded shuffle (in the order of ``sizes``)."""
    if sum(sizes.values()) > len(rows):
        raise ValueError(f"Asked for {sum(sizes.values())} examples in splits {sizes}, but the set has {len(rows)}.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = [rows[i] for i in order[start : start + size]]
        start += size
    return out
