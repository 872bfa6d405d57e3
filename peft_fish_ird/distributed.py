"""Cross-process helpers (pure torch.distributed; no-ops in a single process).

Under ``torchrun`` / ``accelerate launch`` every rank draws the same Fisher samples with the same
seed; each rank back-propagates its share of the batches and the sums are all-reduced, so every
rank ends with the identical scores and mask. Only rank 0 shows progress bars or writes files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_without_process_group() -> bool:
    """True under a multi-process launcher whose process group is not initialised yet."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized())


def ensure_process_group() -> bool:
    """Initialise torch.distributed from the launcher's environment if it is not yet (returns True
    if it did). Without it every rank would pick its own mask (e.g. from a differently initialised
    head) and DDP would later fail on mismatched parameters. Accelerate and HF Trainer reuse an
    existing process group."""
    if not launched_without_process_group():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def sync_module_states(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (as DDP does when it wraps a model), so
    the Fisher pass sees the same weights everywhere - e.g. a randomly initialised task head."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            data = tensor.data
            if is_dtensor(tensor):
                continue  # FSDP2's shards differ per rank by design; fully_shard laid them out from one model
            shared, home = collective_tensor(data)
            dist.broadcast(shared, src=0)
            if shared is not data:
                data.copy_(shared.to(home))


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, min or max); returns the tensor."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (so all ranks take the same decision)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=0)
    return float(t.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_tensor(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.device]:
    """The tensor on the device the backend reduces on (NCCL: the current GPU), and its home device."""
    home = tensor.device
    if is_distributed():
        return tensor.to(_collective_device()), home
    return tensor, home


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (or its ``.data``) is a ``DTensor``: a shard laid out by FSDP2 or tensor parallelism."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor) or isinstance(getattr(tensor, "data", None), DTensor)


def uses_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` holds modules sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def check_not_sharded(model: nn.Module) -> None:
    """Refuse sharded parameters that the Fisher pass cannot see whole (FSDP1, DeepSpeed ZeRO-3,
    DTensor outside FSDP2).

    FSDP2 (``fully_shard``) is accepted: it gathers each module's full weights for its forward
    and backward, and the per-sample rules need only a layer's input and output gradient (and,
    for the generic rule, its gathered weight), so every rank's scores are exact; ranks run in
    lockstep (``needs_lockstep``). Other sharding would silently produce partial scores.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise RuntimeError(_SHARDED_MESSAGE.format(what="FSDP1 (FullyShardedDataParallel)"))
    fsdp2 = uses_fsdp2(model)
    for param in model.parameters():
        if is_zero3_partitioned(param):
            raise RuntimeError(_SHARDED_MESSAGE.format(what="DeepSpeed ZeRO-3"))
        if not fsdp2 and is_dtensor(param):
            raise RuntimeError(_SHARDED_MESSAGE.format(what="DTensor-sharded parameters (outside FSDP2)"))


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 holds this parameter as partitions (its local tensor is then empty)."""
    return hasattr(param, "ds_id") or hasattr(param, "ds_status")


def check_not_partitioned_at_injection(model: nn.Module) -> None:
    """Refuse ``get_peft_model`` on weights ZeRO-3 has already partitioned (``deepspeed.zero.Init``,
    which HF ``from_pretrained`` uses when a ZeRO-3 ``TrainingArguments`` exists): every shape
    FishIRD reads there is the empty local one, so masks would silently come out empty."""
    if any(is_zero3_partitioned(p) for p in model.parameters()):
        raise RuntimeError(
            "get_peft_model(..., FishIRDConfig) got a model whose weights DeepSpeed ZeRO-3 has already partitioned "
            "(deepspeed.zero.Init; HF from_pretrained does this when a TrainingArguments with a ZeRO-3 config "
            "exists). Load the model first, then get_peft_model and prepare, then create the TrainingArguments / "
            "call deepspeed.initialize: ZeRO-3 then partitions the prepared model, and training under it works."
        )


def needs_lockstep(model: nn.Module) -> bool:
    """Whether every rank must run the same number of forward/backward passes (FSDP2 gathers
    weights with collectives inside them)."""
    return is_distributed() and uses_fsdp2(model)


def average_gradients_across_ranks(params: list[torch.Tensor]) -> None:
    """Give each parameter a hook that replaces its accumulated gradient by the mean over ranks.

    For values created after ``fully_shard`` (``prepare`` on an FSDP2 model): FSDP2 reduces only
    the parameters it sharded, so without this every rank would train its own values. Under
    gradient accumulation the earlier micro-batches' part is already equal on every rank, so
    averaging again keeps it."""
    if not is_distributed():
        return
    world = world_size()

    def mean_over_ranks(param: torch.Tensor) -> None:
        shared, home = collective_tensor(param.grad)
        dist.all_reduce(shared)
        param.grad.copy_((shared / world).to(home))

    for param in params:
        if param.requires_grad and param.numel():
            param.register_post_accumulate_grad_hook(mean_over_ranks)


_SHARDED_MESSAGE = (
    "FishIRD's Fisher pass needs each layer's full parameters, but this model uses {what}. Call "
    "`peft_model.prepare(...)` before the model is wrapped/sharded (i.e. before building the Trainer or "
    "calling accelerator.prepare), or shard it with FSDP2 (`fully_shard`), which prepare supports; then train. "
    "DDP and DeepSpeed ZeRO-1/2/3 training work after prepare."
)
