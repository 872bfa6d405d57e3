"""Fisher engine: exact sums of squared per-sample gradients, computed in batches.

For samples n and parameter entries j, with g_nj the gradient of sample n's own loss:

* ``empirical``: ``F_j = sum_n g_nj**2`` where the loss is that of the true label;
* ``expected`` (classification): ``F_j = sum_n sum_c p(c|x_n) * (d(-log p(c|x_n))/d theta_j)**2``;
* per-sample scores: ``s_n = sum_{j in P} g_nj**2`` (optionally restricted to a parameter range P).

A sample's loss is its *own* loss (``losses.py``), so per-sample gradients do not depend on the
batch size. The batch loss that is back-propagated is the SUM of per-sample losses; each layer's
per-sample gradient is then formed from the layer input and output gradient by its type's rule
(``layer_types``) in a tensor hook, squared and summed at once (``sink.py``): memory stays at one
layer's ``B x numel`` at a time and the base parameters never get a ``.grad``. Per-sample
gradients and each batch's sums are float32 whatever the model's dtype; the totals over batches
are float64, so the order in which batches (or ranks, under ``torch.distributed``) are added does
not change the ranking.

This package never imports PEFT; ``reference.fisher_loop`` is its slow, obvious twin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..layer_types import describe_supported, layer_type_for
from .hooks import FisherHooks, frozen_eval
from .losses import LossFn, class_log_probs, output_logits, per_sample_losses
from .tied import check_every_use_targeted

FisherType = Literal["empirical", "expected"]


class NonFiniteFisherError(FloatingPointError):
    """A sample produced a NaN/inf loss or gradient during the Fisher pass."""


@dataclass
class FisherResult:
    """Output of a Fisher pass.

    Attributes:
        scores: ``"<module>.<param>"`` -> float64 tensor of the parameter's shape, ``F_j``.
        sample_scores: float32 ``(num_samples,)``, ``s_n`` in the order the samples were fed.
        num_samples: samples seen.
        seconds: wall time of the pass.
    """

    scores: dict[str, torch.Tensor]
    sample_scores: torch.Tensor
    num_samples: int
    seconds: float


def batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise ValueError("Fisher batch holds no tensors; pass collated batches (dicts of tensors).")


def check_targets(targets: Mapping[str, nn.Module]) -> None:
    missing = {name: type(m).__name__ for name, m in targets.items() if layer_type_for(m) is None}
    if missing:
        raise TypeError(
            f"No per-sample Fisher rule for {missing}. Supported types: {describe_supported()}; exclude these "
            "modules or register the type with `peft_fish_ird.layer_types.register_layer_type`."
        )


# --------------------------------------------------------------------------- entry point
def compute_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    targets: Mapping[str, nn.Module],
    fisher: FisherType = "empirical",
    *,
    sample_score_masks: Optional[Mapping[str, torch.Tensor]] = None,
    loss_fn: Optional[LossFn] = None,
    progress: bool = True,
    desc: str = "Fisher",
    sample_scores: bool = True,
) -> FisherResult:
    """Exact diagonal Fisher of ``targets``' parameters over the samples in ``batches``.

    Args:
        model: called as ``model(**batch_without_labels)``; must return logits (``.logits`` or first item).
        batches: collated batches (dicts of batch-first tensors) holding ``labels``.
        targets: name -> module whose ``weight``/``bias`` are scored (types in ``layer_types``).
        fisher: ``"empirical"`` or ``"expected"`` (see module docstring).
        sample_score_masks: ``"<module>.<param>"`` -> bool mask (parameter shape): restricts the
            per-sample scores ``s_n`` to a parameter range. Default: all entries.
        loss_fn: ``loss_fn(logits, labels) -> (B,)`` per-sample losses (empirical only).
        progress: show a tqdm bar (rank 0 only).
        sample_scores: also form the per-sample scores ``s_n`` (IRD ranks samples by them). False
            skips their pass over every per-sample gradient (plain FISH needs only ``F_j``; about 1%
            of the engine's time on MiniLM, ``benchmarks/results/speed.md``) and returns an empty
            ``sample_scores``. A non-finite gradient is then caught in the totals, and the pass is
            run again with per-sample scores to name the sample.

    Under ``torch.distributed`` (more than one rank) every rank must pass the same batches; rank r
    back-propagates batches r, r + world, ... and the sums are all-reduced, so all ranks return
    the same result. Under FSDP2 a rank with fewer batches runs thrown-away passes, so every rank
    joins the same weight gathers.

    Raises:
        NonFiniteFisherError: a sample's loss or gradient is NaN/inf (its index is named).
    """
    _check_arguments(fisher, sample_score_masks, sample_scores)
    again = dict(fisher=fisher, sample_score_masks=sample_score_masks, loss_fn=loss_fn, progress=progress, desc=desc)
    check_targets(targets)
    check_every_use_targeted(model, targets)
    loss_fn = loss_fn or per_sample_losses
    batches = list(batches)
    sizes = [batch_size_of(b) for b in batches]
    mine = _batches_of_this_rank(model, len(batches))
    hooks = FisherHooks(targets, sample_score_masks or {}, per_sample=sample_scores)
    per_sample = torch.zeros(sum(sizes) if sample_scores else 0, dtype=torch.float32, device=_device_of(model))
    start = time.perf_counter()
    show = progress and distributed.is_main_process()
    with frozen_eval(model), hooks.installed(), torch.enable_grad():
        batch_order = tqdm(mine, total=len(mine), desc=desc, unit="batch", disable=not show)
        first_bad = _accumulate(model, batches, batch_order, sizes, hooks, per_sample, fisher, loss_fn)
    _reduce(hooks.totals, per_sample, first_bad)
    if not sample_scores and int(first_bad[0]) == _NO_BAD_SAMPLE and not _all_finite(hooks.totals):
        # a gradient went non-finite with a finite loss: the pass with per-sample scores names the sample
        # (every rank sees the same reduced totals, so all of them run it again, in lockstep)
        return compute_fisher(model, batches, targets, **again, sample_scores=True)
    _raise_if_bad(first_bad)
    return FisherResult(_shaped(hooks.totals, targets), per_sample.cpu(), sum(sizes), time.perf_counter() - start)


def _check_arguments(
    fisher: str, sample_score_masks: Optional[Mapping[str, torch.Tensor]], sample_scores: bool
) -> None:
    if fisher not in get_args(FisherType):
        raise ValueError(f"fisher={fisher!r}: choose one of {get_args(FisherType)}.")
    if sample_score_masks and not sample_scores:
        raise ValueError("sample_score_masks restrict the per-sample scores: pass sample_scores=True with them.")


def _batches_of_this_rank(model: nn.Module, num_batches: int) -> list[int]:
    """Rank r's batches r, r + world, ...; under FSDP2 padded with -1 (a thrown-away pass) so every
    rank runs as many passes and joins the same weight gathers."""
    mine = [i for i in range(num_batches) if i % distributed.world_size() == distributed.rank()]
    if distributed.needs_lockstep(model):
        mine += [-1] * (-(-num_batches // distributed.world_size()) - len(mine))
    return mine


def _raise_if_bad(first_bad: torch.Tensor) -> None:
    if int(first_bad[0]) != _NO_BAD_SAMPLE:
        raise NonFiniteFisherError(
            f"Fisher sample {int(first_bad[0])} (0-based, in the order drawn) produced a non-finite loss or "
            "gradient. Check that sample's inputs/labels, or run the model in float32."
        )


def _shaped(totals: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Flat float64 totals as tensors of their parameters' shapes."""
    out = {}
    for key, flat in totals.items():
        module_name, param_name = key.rsplit(".", 1)
        module = targets[module_name]
        out[key] = flat.view(layer_type_for(module).specs_of(module)[param_name].shape)
    return out


_NO_BAD_SAMPLE = 2**62


def _accumulate(model, batches, order, sizes, hooks, sample_scores, fisher, loss_fn) -> torch.Tensor:
    """Back-propagate this rank's batches into ``hooks``' sums; returns the first bad sample (or the sentinel)."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    first_bad = torch.tensor([_NO_BAD_SAMPLE], dtype=torch.int64)
    for i in order:
        if i < 0:  # a rank's lockstep filler (FSDP2): the same collectives, nothing kept
            hooks.begin_batch(sizes[0], sample_scores.device)
            _backward_batch(model, batches[0], fisher, loss_fn, hooks.flush_tied)
            hooks.discard_batch()
            continue
        hooks.begin_batch(sizes[i], sample_scores.device)
        bad = _backward_batch(model, batches[i], fisher, loss_fn, hooks.flush_tied)
        if bad is None and hooks.per_sample:
            bad = _first_non_finite(hooks.batch_sample_scores)
        if bad is not None:  # keep going so every rank reaches the collectives after the loop
            first_bad[0] = min(int(first_bad[0]), offsets[i] + bad)
            hooks.discard_batch()
            continue
        hooks.end_batch()
        if hooks.per_sample:
            sample_scores[offsets[i] : offsets[i] + sizes[i]] = hooks.batch_sample_scores
    return first_bad


def _backward_batch(
    model: nn.Module, batch: Mapping[str, Any], fisher: str, loss_fn: LossFn, after_backward: Callable[[], None]
) -> Optional[int]:
    """Forward and backward of one batch; returns the in-batch index of a non-finite loss, if any.

    ``after_backward`` runs after every backward pass (tied tensors square their summed uses there:
    the expected Fisher squares each class's gradient apart)."""
    labels = batch.get("labels")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = output_logits(model(**inputs))
    if fisher == "empirical":
        losses = loss_fn(logits, labels)
        bad = _first_non_finite(losses)
        if bad is None:
            losses.sum().backward()
            after_backward()
        return bad
    log_p = class_log_probs(logits)
    bad = _first_non_finite(log_p.sum(-1))
    if bad is not None:
        return bad
    weight = log_p.detach().exp().sqrt()  # sum_c p_c g_c^2 = sum_c (sqrt(p_c) g_c)^2
    for c in range(log_p.shape[-1]):
        (-(log_p[:, c] * weight[:, c])).sum().backward(retain_graph=c < log_p.shape[-1] - 1)
        after_backward()
    return None


def _reduce(totals: dict[str, torch.Tensor], sample_scores: torch.Tensor, first_bad: torch.Tensor) -> None:
    """Sum every rank's share (float64 totals; disjoint per-sample slots) and agree on errors."""
    if not distributed.is_distributed():
        return
    bad, _ = distributed.collective_tensor(first_bad)
    distributed.all_reduce_(bad, "min")
    first_bad.copy_(bad.cpu())
    for key, total in totals.items():
        shared, home = distributed.collective_tensor(total)
        distributed.all_reduce_(shared)
        totals[key] = shared.to(home)
    if sample_scores.numel():
        shared, home = distributed.collective_tensor(sample_scores)
        distributed.all_reduce_(shared)
        sample_scores.copy_(shared.to(home))


def _all_finite(totals: Mapping[str, torch.Tensor]) -> bool:
    """Whether every total is finite (one reduction per parameter; squares are >= 0, so a NaN or inf
    anywhere makes its sum non-finite)."""
    return all(bool(torch.isfinite(t.sum())) for t in totals.values())


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _first_non_finite(values: torch.Tensor) -> Optional[int]:
    bad = ~torch.isfinite(values)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None
