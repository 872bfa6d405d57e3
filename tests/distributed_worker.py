"""Worker launched by tests/test_distributed.py with torchrun (1 or 2 processes, gloo, CPU).

    torchrun --standalone --nproc_per_node N tests/distributed_worker.py MODE OUT_DIR

MODE: fisher | ird | probe (prepare only; probe: head probing first, from a rank-dependent head),
trainer | accelerate (prepare, then 4 optimizer steps with a global batch of 8 split over the
ranks), fsdp2_prepare | fsdp2_train (a tiny Llama under FSDP2, see ``fsdp2``), accelerate_fsdp2,
deepspeed_zero2 | deepspeed_zero3 (see ``deepspeed_zero``), deepspeed_zero_init.
Each rank saves its masks and values to OUT_DIR/rank{r}.pt.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import fish_config, make_examples, pad_collate, tiny_bert  # noqa: E402

from peft_fish_ird import get_peft_model  # noqa: E402
from peft_fish_ird.layer import FishIRDLayer  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 4


def snapshot(model):
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, FishIRDLayer):
            for p in module.base_param_names():
                out[f"{name}.{p}.indices"] = module.indices(p)["default"].clone()
                out[f"{name}.{p}.values"] = module.values(p)["default"].detach().clone()
    head = model.base_model.model.classifier.modules_to_save["default"]
    out["head.weight"] = head.weight.detach().clone()
    return out


def no_dropout_bert():
    model = tiny_bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def rank_dependent_head(model):
    """Re-initialise the task head differently on every rank, as an unseeded from_pretrained does."""
    torch.manual_seed(1000 + int(os.environ.get("RANK", "0")))
    model.classifier.reset_parameters()
    return model


def equal_length_lm_examples(n: int, length: int = 10, prompt: int = 3) -> list[dict]:
    """SFT-style examples of one length: every rank's mean loss then averages to the global one."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 97, (n, length), generator=g).tolist()
    return [{"input_ids": r, "attention_mask": [1] * length, "labels": [-100] * prompt + r[prompt:]} for r in ids]


def fsdp2(mode: str, out_dir: str, world: int) -> dict:
    """FSDP2 (fully_shard per decoder layer, then the root) on a tiny Llama, gloo:

    * ``fsdp2_prepare``: shard first, then get_peft_model + prepare on the sharded model (20 Fisher
      samples in batches of 4: 5 batches, so the ranks' shares differ and lockstep is needed);
    * ``fsdp2_train``: prepare unsharded, then shard the PEFT model.

    Then 4 steps, each rank on its slice of a global batch of 8; rank 0 saves the adapter."""
    from conftest import lm_collate, tiny_llama
    from torch.distributed.fsdp import fully_shard

    from peft_fish_ird import FishIRDConfig

    dist.init_process_group("gloo")
    examples = equal_length_lm_examples(40)
    config = FishIRDConfig(task_type="CAUSAL_LM", keep_ratio=0.05, num_samples=20, fisher_batch_size=4)

    def shard(llama):
        for block in llama.model.layers:
            fully_shard(block)
        fully_shard(llama)

    base = tiny_llama()
    if mode == "fsdp2_prepare":
        shard(base)
        model = get_peft_model(base, config)
        model.prepare(examples, data_collator=lm_collate, progress=False)
    else:
        model = get_peft_model(base, config)
        model.prepare(examples, data_collator=lm_collate, progress=False)
        shard(model.base_model.model)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, FishIRDLayer)}
    out = {f"{n}.{p}.indices": m.indices(p)["default"].clone() for n, m in layers.items() for p in m.base_param_names()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rank, share = dist.get_rank(), GLOBAL_BATCH // world
    model.train()
    for step in range(STEPS):
        rows = examples[step * GLOBAL_BATCH :][rank * share : (rank + 1) * share]
        model(**lm_collate(rows)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for n, m in layers.items():
        for p in m.base_param_names():
            values = m.values(p)["default"]
            full = (
                values.full_tensor() if hasattr(values, "full_tensor") else values
            )  # sharded by FSDP2 if it manages it
            out[f"{n}.{p}.values"] = full.detach().clone()
    # every rank calls it, rank 0 writes; without the (sharded) base embedding PEFT adds by default
    model.save_pretrained(os.path.join(out_dir, "adapter"), save_embedding_layers=False, is_main_process=rank == 0)
    return out


def accelerate_fsdp2(world: int) -> dict:
    """Accelerate's FSDP plugin (FSDP2, one unit per decoder layer) trains the prepared tiny Llama."""
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from conftest import lm_collate, tiny_llama

    from peft_fish_ird import FishIRDConfig

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"]
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    examples = equal_length_lm_examples(40)
    config = FishIRDConfig(task_type="CAUSAL_LM", keep_ratio=0.05, num_samples=20, fisher_batch_size=4)
    model = get_peft_model(tiny_llama(), config, train_dataset=examples, data_collator=lm_collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank, share = accelerator.process_index, GLOBAL_BATCH // world
    model.train()
    for step in range(STEPS):
        rows = examples[step * GLOBAL_BATCH :][rank * share : (rank + 1) * share]
        accelerator.backward(model(**lm_collate(rows)).loss)
        optimizer.step()
        optimizer.zero_grad()
    out = {}
    for n, m in accelerator.unwrap_model(model).base_model.model.named_modules():
        if isinstance(m, FishIRDLayer):
            for p in m.base_param_names():
                values = m.values(p)["default"]
                out[f"{n}.{p}.values"] = (values.full_tensor() if hasattr(values, "full_tensor") else values).detach()
    return out


def deepspeed_zero(stage: int, out_dir: str, world: int, examples: list[dict]) -> dict:
    """Prepare on the whole model, then DeepSpeed ZeRO-``stage`` (CPU + gloo; at stage 3 every
    parameter partitioned) trains it: STEPS steps of GLOBAL_BATCH examples split over the ranks.
    Records the gathered values, whether a plain save_pretrained (which under ZeRO-3 would see only
    this rank's shard) refused, and saves the gathered adapter from rank 0."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = get_peft_model(
        no_dropout_bert(), fish_config(num_samples=32), train_dataset=examples, data_collator=pad_collate
    )
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * per_rank
        loss = engine(**pad_collate(examples[start : start + per_rank])).loss
        engine.backward(loss)
        engine.step()
    result = {"partitioned": all(p.numel() == 0 for p in engine.module.parameters() if p.requires_grad)}
    try:
        if rank == 0:
            engine.module.save_pretrained(os.path.join(out_dir, "plain"))
        result["plain_save_refused"] = ""
    except RuntimeError as err:
        result["plain_save_refused"] = str(err)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        result.update(snapshot(engine.module))
        if rank == 0:
            engine.module.save_pretrained(os.path.join(out_dir, "adapter"))
    return result


def deepspeed_zero_init() -> dict:
    """get_peft_model on a module built inside deepspeed.zero.Init (weights partitioned at creation)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from peft_fish_ird import FishIRDConfig

    deepspeed.init_distributed(dist_backend="gloo")
    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 1}):
        base = torch.nn.ModuleDict({"lin": torch.nn.Linear(8, 8)})
    result = {"local_numel": base["lin"].weight.numel(), "refused": ""}
    try:
        get_peft_model(base, FishIRDConfig(target_modules=["lin"]))
    except RuntimeError as err:
        result["refused"] = str(err)
    return result


def main(mode: str, out_dir: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "fisher":
        dist.init_process_group("gloo")  # the other modes rely on prepare / Trainer / Accelerate to do it
    examples = make_examples(48, seed=7)
    overrides = dict(num_samples=32)
    if mode == "ird":
        overrides.update(selection="ird", ird_min_samples=8, ird_eval_steps=2, ird_eval_batch_size=4)
    if mode == "probe":
        overrides.update(head_probe_steps=5, head_probe_lr=0.05, head_probe_batch_size=8)
    if mode in ("fisher", "ird", "probe"):
        base = rank_dependent_head(tiny_bert()) if mode in ("ird", "probe") else tiny_bert()
        model = get_peft_model(base, fish_config(**overrides), train_dataset=examples, data_collator=pad_collate)
        result = snapshot(model)
        result["trace"] = [list(r) for r in model.selection.trace]
    elif mode == "trainer":
        from datasets import Dataset
        from transformers import Trainer, TrainingArguments

        model = get_peft_model(
            rank_dependent_head(no_dropout_bert()),
            fish_config(**overrides),
            train_dataset=examples,
            data_collator=pad_collate,
        )  # before TrainingArguments: prepare starts torch.distributed
        args = TrainingArguments(
            output_dir=os.path.join(out_dir, "run"),
            per_device_train_batch_size=GLOBAL_BATCH // world,
            max_steps=STEPS,
            learning_rate=1e-2,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            ddp_backend="gloo",
            average_tokens_across_devices=False,
            train_sampling_strategy="sequential",
            disable_tqdm=True,
            logging_steps=1,
            seed=0,
            dataloader_drop_last=True,
        )
        Trainer(model=model, args=args, train_dataset=Dataset.from_list(examples), data_collator=pad_collate).train()
        result = snapshot(model)
    elif mode == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        model = get_peft_model(
            no_dropout_bert(), fish_config(**overrides), train_dataset=examples, data_collator=pad_collate
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loader = torch.utils.data.DataLoader(examples, batch_size=GLOBAL_BATCH // world, collate_fn=pad_collate)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        model.train()
        for step, batch in enumerate(loader):
            if step == STEPS:
                break
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
        result = snapshot(accelerator.unwrap_model(model))
    elif mode in ("fsdp2_prepare", "fsdp2_train"):
        result = fsdp2(mode, out_dir, world)
    elif mode == "accelerate_fsdp2":
        result = accelerate_fsdp2(world)
    elif mode == "deepspeed_zero_init":
        result = deepspeed_zero_init()
    elif mode in ("deepspeed_zero2", "deepspeed_zero3"):
        result = deepspeed_zero(int(mode[-1]), out_dir, world, examples)
    else:
        raise SystemExit(f"unknown mode {mode}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
