"""Two processes (torchrun, gloo, CPU) give the same mask as one, and DDP training matches one process;
the same under FSDP2 (fully_shard, and Accelerate's FSDP plugin), for prepare, training and saving;
and DeepSpeed ZeRO-3 training and saving of an adapter prepared before it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

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
        for mode in ("fisher", "ird", "probe", "trainer", "accelerate")
        for n in (1, 2)
    }


@pytest.mark.parametrize("mode", ["fisher", "ird", "probe"])
def test_two_process_mask_equals_one_process_mask_exactly(runs, mode):
    one, (r0, r1) = runs[(mode, 1)][0], runs[(mode, 2)]
    for key, value in _tensors(one).items():
        if key.endswith(".indices"):
            assert torch.equal(r0[key], value), key
            assert torch.equal(r1[key], value), key


def test_a_head_probed_in_two_processes_equals_the_one_process_head(runs):
    one, (r0, r1) = runs[("probe", 1)][0], runs[("probe", 2)]
    assert not torch.equal(one["head.weight"], runs[("ird", 1)][0]["head.weight"])  # same start; the probe trained it
    assert torch.equal(r0["head.weight"], r1["head.weight"])
    torch.testing.assert_close(r0["head.weight"], one["head.weight"], rtol=0, atol=1e-6)


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


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    out = {}
    for mode in ("fsdp2_prepare", "fsdp2_train", "accelerate_fsdp2"):
        for n in (1, 2):
            out[(mode, n)] = _launch(mode, n, root / f"{mode}{n}")
            adapter = root / f"{mode}{n}" / "adapter" / "adapter_model.safetensors"
            if adapter.exists():
                out[(mode, n, "adapter")] = load_file(adapter)
    return out


def test_prepare_on_an_fsdp2_sharded_model_gives_the_unsharded_mask(fsdp2_runs):
    unsharded = fsdp2_runs[("fsdp2_train", 1)][0]  # prepared before fully_shard, one process
    for n in (1, 2):
        for rank_result in fsdp2_runs[("fsdp2_prepare", n)]:
            indices = {k: v for k, v in rank_result.items() if k.endswith(".indices")}
            assert indices.keys() == {k for k in unsharded if k.endswith(".indices")}
            for key, value in indices.items():
                assert torch.equal(value, unsharded[key]), key


@pytest.mark.parametrize("mode", ["fsdp2_prepare", "fsdp2_train", "accelerate_fsdp2"])
def test_fsdp2_training_keeps_ranks_identical_and_matches_one_process(fsdp2_runs, mode):
    one, (r0, r1) = fsdp2_runs[(mode, 1)][0], fsdp2_runs[(mode, 2)]
    values = [k for k in one if k.endswith(".values")]
    assert any(bool(one[k].abs().sum() > 0) for k in values), "the sparse values must have trained"
    for key in values:
        assert torch.equal(r0[key], r1[key]), f"ranks differ at {key}"
        assert torch.allclose(r0[key], one[key], atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize("mode", ["fsdp2_prepare", "fsdp2_train"])
def test_saving_from_an_fsdp2_model_writes_the_one_process_adapter(fsdp2_runs, mode):
    one, two = fsdp2_runs[(mode, 1, "adapter")], fsdp2_runs[(mode, 2, "adapter")]
    assert one.keys() == two.keys()
    for key in one:
        if "selection_record" not in key:  # the record holds timings
            assert torch.allclose(one[key].float(), two[key].float(), atol=1e-6, rtol=1e-5), key


def test_fully_shard_after_get_peft_model_and_before_prepare_is_refused(tmp_path):
    """FSDP2 would manage the still-empty values, which prepare has to replace."""
    from conftest import lm_collate, lm_examples, tiny_llama
    from torch.distributed.fsdp import fully_shard

    from peft_fish_ird import FishIRDConfig, get_peft_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = get_peft_model(tiny_llama(), FishIRDConfig(task_type="CAUSAL_LM", num_samples=8))
        fully_shard(model.base_model.model)
        with pytest.raises(RuntimeError, match="fully_shard was applied after get_peft_model"):
            model.prepare(lm_examples(8), data_collator=lm_collate, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("zero")
    out = {}
    for stage in (2, 3):
        for n in (1, 2):
            folder = root / f"zero{stage}_{n}"
            out[(stage, n)] = _launch(f"deepspeed_zero{stage}", n, folder)
            out[(stage, n, "adapter")] = load_file(folder / "adapter" / "adapter_model.safetensors")
            plain = folder / "plain" / "adapter_model.safetensors"
            out[(stage, n, "plain")] = load_file(plain) if plain.exists() else None
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_training_of_a_prepared_adapter_matches_one_process(zero_runs, stage):
    one, (r0, r1) = zero_runs[(stage, 1)][0], zero_runs[(stage, 2)]
    assert one["partitioned"] == r0["partitioned"] == (stage == 3)  # ZeRO-3 really held only shards
    values = [k for k in one if k.endswith(".values")]
    assert any(bool(one[k].abs().sum() > 0) for k in values), "the sparse values must have trained"
    for key in [*values, "head.weight"]:
        assert torch.equal(r0[key], r1[key]), f"ranks differ at {key}"
        assert torch.allclose(r0[key], one[key], atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_saves_the_one_process_adapter_and_zero3_refuses_a_shard_only_file(zero_runs, stage):
    one, two = zero_runs[(stage, 1, "adapter")], zero_runs[(stage, 2, "adapter")]
    assert one.keys() == two.keys()
    for key in one:
        if "selection_record" not in key:
            assert torch.allclose(one[key].float(), two[key].float(), atol=1e-6, rtol=1e-5), key
    refused = zero_runs[(stage, 2)][0]["plain_save_refused"]  # rank 0 saved without gathering
    if stage == 3:
        assert "only this rank's shard" in refused and zero_runs[(stage, 2, "plain")] is None
    else:  # ZeRO-2 leaves whole parameters on every rank: a plain save is the same file
        assert refused == "" and zero_runs[(stage, 2, "plain")].keys() == two.keys()


def test_get_peft_model_refuses_weights_zero3_already_partitioned(tmp_path):
    """In a worker process: deepspeed.zero.Init patches torch functions while it is open, so it stays
    out of the test process."""
    pytest.importorskip("deepspeed")
    (result,) = _launch("deepspeed_zero_init", 1, tmp_path)
    assert result["local_numel"] == 0  # the local tensor is empty: masks would be sized from it
    assert "ZeRO-3 has already partitioned" in result["refused"]
