"""bf16/fp16 models: Fisher in float32+, float32 master values, training runs; sharded models refused."""

import pytest
import torch
from conftest import fish_config, make_examples, pad_collate, tiny_bert
from peft import get_peft_model
from torch import nn

from peft_fish_ird import distributed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_prepares_and_trains_float32_values(dtype):
    model = get_peft_model(tiny_bert().to(dtype), fish_config())
    record = model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    assert record.score_summary["selected_fisher_share"] > 0
    values = [p for n, p in model.named_parameters() if "fishird_" in n and p.numel()]
    assert values and all(v.dtype == torch.float32 for v in values)
    params = [p for p in model.parameters() if p.requires_grad]
    # pure-fp16 AdamW on the fp16 head copy divides by an eps that underflows (LoRA NaNs the same way)
    optimizer = torch.optim.AdamW(params, lr=1e-2) if dtype == torch.bfloat16 else torch.optim.SGD(params, lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(**pad_collate(make_examples(8, seed=2))).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(float(v.detach().abs().sum()) > 0 for v in values)


def test_float32_model_trains_under_bf16_autocast():
    model = get_peft_model(tiny_bert(), fish_config())
    model.prepare(make_examples(24), data_collator=pad_collate, progress=False)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**pad_collate(make_examples(8, seed=2))).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "fishird_" in n and p.numel()]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_sharded_parameters_are_refused_before_the_fisher_pass():
    model = get_peft_model(tiny_bert(), fish_config())
    next(model.parameters()).ds_id = 7  # what DeepSpeed ZeRO-3 attaches to partitioned parameters
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        model.prepare(make_examples(24), data_collator=pad_collate, progress=False)


def test_fsdp2_is_accepted_and_dtensor_outside_fsdp2_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    # real FSDP2 / DTensor modules need a process group: here one process with gloo
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        distributed.check_not_sharded(fully_shard(nn.Sequential(nn.Linear(2, 2))))  # prepare supports FSDP2
        tensor_parallel = nn.Linear(2, 2)
        mesh = init_device_mesh("cpu", (1,))
        tensor_parallel.weight = nn.Parameter(distribute_tensor(tensor_parallel.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(RuntimeError, match="DTensor-sharded parameters \\(outside FSDP2\\)"):
            distributed.check_not_sharded(tensor_parallel)
    finally:
        dist.destroy_process_group()
