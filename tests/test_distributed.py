"""Two processes (torchrun, gloo, CPU) give the same mask as one, and DDP training matches one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)
WORKER = Path(__file__).with_name("distributed_worker.py")


def _launch(mode: str, nproc: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        mode,
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


def _tensors(result: dict) -> dict:
    return {k: v for k, v in result.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {
        (mode, n): _launch(mode, n, root / f"{mode}{n}")
        for mode in ("fisher", "ird", "trainer", "accelerate")
        for n in (1, 2)
    }


@pytest.mark.parametrize("mode", ["fisher", "ird"])
def test_two_process_mask_equals_one_process_mask_exactly(runs, mode):
    one, (r0, r1) = runs[(mode, 1)][0], runs[(mode, 2)]
    for key, value in _tensors(one).items():
        if key.endswith(".indices"):
            assert torch.equal(r0[key], value), key
            assert torch.equal(r1[key], value), key


def test_ird_rounds_and_scores_agree_across_process_counts(runs):
    one, (r0, r1) = runs[("ird", 1)][0], runs[("ird", 2)]
    rows = lambda t: [row[:4] for row in t]  # noqa: E731  (seconds differ)
    assert rows(r0["trace"]) == rows(r1["trace"]) == rows(one["trace"])


@pytest.mark.parametrize("mode", ["trainer", "accelerate"])
def test_ddp_training_keeps_ranks_identical_and_matches_one_process(runs, mode):
    one, (r0, r1) = runs[(mode, 1)][0], runs[(mode, 2)]
    trained = False
    for key, value in _tensors(one).items():
        assert torch.equal(r0[key], r1[key]), f"ranks differ at {key}"
        assert torch.allclose(r0[key].float(), value.float(), atol=1e-6, rtol=1e-5), key
        trained |= key.endswith(".values") and bool(value.abs().sum() > 0)
    assert trained, "the sparse values must have trained"
