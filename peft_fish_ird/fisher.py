"""Fisher engine: exact sums of squared per-sample gradients, computed in batches.

For samples n and parameter entries j, with g_nj the gradient of sample n's own loss:

* ``empirical``: ``F_j = sum_n g_nj**2`` where the loss is that of the true label;
* ``expected`` (classification): ``F_j = sum_n sum_c p(c|x_n) * (d(-log p(c|x_n))/d theta_j)**2``;
* per-sample scores: ``s_n = sum_{j in P} g_nj**2`` (optionally restricted to a parameter range P).

A sample's loss is its *own* loss, as with a batch of one (HF's mean over a sample's tokens for
causal LMs), so per-sample gradients do not depend on the batch size. The batch loss that is
back-propagated is the SUM of per-sample losses; each layer's per-sample gradient is then formed
from the layer input and output gradient by a per-layer-type rule (a registry, ``RULES``) in a
tensor hook, squared and summed at once: memory stays at one layer's ``B x numel`` at a time and
the base parameters never get a ``.grad``. Per-sample gradients and each batch's sums are float32
whatever the model's dtype; the totals over batches are float64, so the order in which batches
(or ranks, under ``torch.distributed``) are added does not change the ranking.

This module never imports PEFT; ``reference.fisher_loop`` is its slow, obvious twin.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from . import distributed

FisherType = Literal["empirical", "expected"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PARAM_NAMES = ("weight", "bias")


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


# --------------------------------------------------------------------------- losses
def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sample's own loss, shape ``(B,)``, computed in float32.

    * classification, logits ``(B, C)`` and integer labels ``(B,)``: cross-entropy;
    * regression, logits ``(B, 1)`` and float labels ``(B,)``: squared error;
    * causal LM, logits ``(B, T, V)`` and labels ``(B, T)`` (``-100`` ignored): next-token
      cross-entropy averaged over the sample's own labelled tokens (HF's loss for a batch of one).
    """
    if labels is None:
        raise ValueError(
            "The Fisher batch has no 'labels': fisher='empirical' needs the true labels. Add a 'labels' "
            "(or 'label') column, or use fisher='expected' for classification."
        )
    if logits.dim() == 2 and labels.dim() == 1:
        if labels.is_floating_point():
            if logits.shape[-1] != 1:
                raise ValueError(f"Float labels need logits of shape (B, 1) (regression), got {tuple(logits.shape)}.")
            return (logits[:, 0].float() - labels.float()).square()
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() == 3 and labels.dim() == 2:
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        token = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            reduction="none",
            ignore_index=-100,
        ).view(shift_labels.shape)
        count = (shift_labels != -100).sum(1).clamp(min=1)
        return token.sum(1) / count
    raise ValueError(
        f"Cannot form per-sample losses from logits {tuple(logits.shape)} and labels {tuple(labels.shape)}: "
        "supported are sequence classification/regression ((B, C) with (B,)) and causal LM ((B, T, V) with "
        "(B, T)). Pass `loss_fn(logits, labels) -> (B,)` for other tasks."
    )


def class_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log p(c|x)`` for the expected Fisher; only classification logits ``(B, C)`` qualify."""
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(
            f"fisher='expected' is exact only for classification logits (B, C>=2), got {tuple(logits.shape)}. "
            "Use fisher='empirical' for causal LMs and regression."
        )
    return torch.log_softmax(logits.float(), dim=-1)


def output_logits(outputs: Any) -> torch.Tensor:
    """The logits of a HF ``ModelOutput``, a tuple or a plain tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is None:
        logits = outputs[0]
    return logits


# --------------------------------------------------------------------------- per-layer rules
class _Sink:
    """Receives one layer's per-sample gradients and adds their squares to the running sums."""

    def __init__(self, engine: "_FisherHooks", module_name: str) -> None:
        self.engine = engine
        self.module_name = module_name

    def dense(self, param_name: str, per_sample_grad: torch.Tensor) -> None:
        """``per_sample_grad``: ``(B, numel)`` float32, row b = sample b's gradient (flattened)."""
        key = f"{self.module_name}.{param_name}"
        sq = per_sample_grad.square_()
        self.engine.scores[key].add_(sq.sum(0))
        mask = self.engine.masks.get(key)
        self.engine.batch_sample_scores.add_(sq @ mask if mask is not None else sq.sum(1))

    def matrix(self, param_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Per-sample gradient ``a[n]^T b[n]`` (rows x cols) for ``a`` (B, T, rows), ``b`` (B, T, cols).

        Large weights: one GEMM per sample, squared and accumulated by a fused ``addcmul_``. Small
        ones: blocks of rows for all samples (``MATRIX_CHUNK_ELEMENTS``), squared and summed while
        in cache. Never the whole ``B x rows x cols`` tensor. Per-sample scores are read off the
        same blocks while they are in cache; the Gram identity ``||a^T b||^2 = sum((a a^T) * (b b^T))``
        avoids that pass but costs ``B T^2 (rows + cols)`` multiply-adds, more than the blocks' own
        ``B rows cols`` squares for any T above ~16 (at 64 tokens it was most of the engine's
        overhead over a plain pass).
        """
        key = f"{self.module_name}.{param_name}"
        batch, rows, cols = a.shape[0], a.shape[2], b.shape[2]
        scores = self.engine.scores[key].view(rows, cols)
        mask = self.engine.masks.get(key)
        mask = None if mask is None else mask.view(rows, cols)
        a_t = a.transpose(1, 2)
        per_sample = torch.zeros(batch, dtype=torch.float32, device=a.device)
        if rows * cols >= PER_SAMPLE_GEMM_MIN_ELEMENTS:
            # large weights: one GEMM per sample, squared and added in one fused pass
            for n in range(batch):
                block = a_t[n] @ b[n]
                scores.addcmul_(block, block)
                flat = block.reshape(-1)
                if mask is None:
                    per_sample[n] = torch.dot(flat, flat)
                else:
                    per_sample[n] = torch.dot(flat.square_(), mask.reshape(-1))
        else:
            step = max(1, MATRIX_CHUNK_ELEMENTS // (batch * cols))
            for start in range(0, rows, step):
                block = torch.bmm(a_t[:, start : start + step], b)
                block.square_()
                scores[start : start + step].add_(block.sum(0))
                flat = block.reshape(batch, -1)
                per_sample.add_(flat @ mask[start : start + step].reshape(-1) if mask is not None else flat.sum(1))
        self.engine.batch_sample_scores.add_(per_sample)

    def rows(self, param_name: str, samples: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor) -> None:
        """Sparse per-sample gradients: sample ``samples[u]`` has gradient ``row_grads[u]`` in row ``rows[u]``."""
        key = f"{self.module_name}.{param_name}"
        width = row_grads.shape[1]
        sq = row_grads.square()
        self.engine.scores[key].view(-1, width).index_add_(0, rows, sq)
        self.engine.touched_rows.setdefault(key, (width, []))[1].append(rows)
        mask = self.engine.masks.get(key)
        per_row = (sq * mask.view(-1, width)[rows]).sum(1) if mask is not None else sq.sum(1)
        self.engine.batch_sample_scores.index_add_(0, samples, per_row)


MATRIX_CHUNK_ELEMENTS = 786_432  # ~3 MB of float32 per block: stays in cache on this CPU
PER_SAMPLE_GEMM_MIN_ELEMENTS = 262_144  # from this weight size on, per-sample GEMM + addcmul is faster
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, _Sink], None]
RULES: dict[type, Rule] = {}


def register_rule(layer_type: type) -> Callable[[Rule], Rule]:
    """Register the per-sample-gradient rule of a layer type: ``rule(module, input, grad_output, sink)``."""

    def wrap(rule: Rule) -> Rule:
        RULES[layer_type] = rule
        return rule

    return wrap


def rule_for(module: nn.Module) -> Optional[Rule]:
    for layer_type in type(module).__mro__:
        if layer_type in RULES:
            return RULES[layer_type]
    return None


def _as_3d(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.reshape(batch, -1, t.shape[-1]).float()


@register_rule(nn.Linear)
def _linear_rule(module: nn.Linear, x: torch.Tensor, g: torch.Tensor, sink: _Sink) -> None:
    """y = x W^T + b: per-sample dW = sum_t g_t x_t^T (out x in), db = sum_t g_t."""
    b = x.shape[0]
    x3, g3 = _as_3d(x, b), _as_3d(g, b)
    sink.matrix("weight", g3, x3)
    if module.bias is not None:
        sink.dense("bias", g3.sum(1))


@register_rule(Conv1D)
def _conv1d_rule(module: Conv1D, x: torch.Tensor, g: torch.Tensor, sink: _Sink) -> None:
    """GPT-2 Conv1D, y = x W + b with W (in x out): per-sample dW = sum_t x_t g_t^T."""
    b = x.shape[0]
    x3, g3 = _as_3d(x, b), _as_3d(g, b)
    sink.matrix("weight", x3, g3)
    if module.bias is not None:
        sink.dense("bias", g3.sum(1))


@register_rule(nn.LayerNorm)
def _layer_norm_rule(module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, sink: _Sink) -> None:
    """y = x_hat * w + b: per-sample dw = sum_t g_t * x_hat_t, db = sum_t g_t (x_hat recomputed)."""
    if module.weight is None and module.bias is None:
        return
    b = x.shape[0]
    width = 1
    for d in module.normalized_shape:
        width *= d
    x3 = x.reshape(b, -1, width).float()
    g3 = g.reshape(b, -1, width).float()
    x_hat = F.layer_norm(x3, (width,), eps=module.eps)  # the normalised input, one fused kernel
    if module.weight is not None:
        sink.dense("weight", (g3 * x_hat).sum(1))
    if module.bias is not None:
        sink.dense("bias", g3.sum(1))


@register_rule(nn.Embedding)
def _embedding_rule(module: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, sink: _Sink) -> None:
    """Per-sample gradient of a lookup: a sample's rows summed per distinct id (repeats add first),
    the padding row excluded. Kept sparse: never a ``B x vocab x dim`` tensor."""
    if module.scale_grad_by_freq or module.max_norm is not None:
        raise NotImplementedError(
            "Fisher rule for nn.Embedding with scale_grad_by_freq or max_norm is not implemented: exclude this "
            "embedding from `target_modules`."
        )
    b = ids.shape[0]
    width = module.embedding_dim
    ids2 = ids.reshape(b, -1)
    g2 = g.reshape(b, -1, width).float()
    sample = torch.arange(b, device=ids.device).unsqueeze(1).expand_as(ids2)
    keep = torch.ones_like(ids2, dtype=torch.bool) if module.padding_idx is None else ids2 != module.padding_idx
    keys = (sample * module.num_embeddings + ids2)[keep]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(unique_keys.numel(), width, dtype=torch.float32, device=g.device)
    sums.index_add_(0, inverse, g2[keep])
    sink.rows("weight", unique_keys // module.num_embeddings, unique_keys % module.num_embeddings, sums)


# --------------------------------------------------------------------------- hooks
class _FisherHooks:
    """Installs forward hooks on the targets that attach an output-gradient hook running the rule."""

    def __init__(self, targets: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor]) -> None:
        self.targets = dict(targets)
        self.masks = {k: m.reshape(-1).float() for k, m in masks.items()}
        self.scores: dict[str, torch.Tensor] = {}
        for name, module in self.targets.items():
            for p in PARAM_NAMES:
                param = getattr(module, p, None)
                if isinstance(param, torch.Tensor):
                    self.scores[f"{name}.{p}"] = torch.zeros(param.numel(), dtype=torch.float32, device=param.device)
        unknown = set(self.masks) - set(self.scores)
        if unknown:
            raise KeyError(f"sample_score_masks name parameters that are not targets: {sorted(unknown)}")
        self.totals = {k: torch.zeros(v.numel(), dtype=torch.float64, device=v.device) for k, v in self.scores.items()}
        self.batch_size = 0
        self.batch_sample_scores = torch.zeros(0)
        self.calls: dict[str, int] = {}
        self.anchor = torch.zeros((), requires_grad=True)

    def begin_batch(self, batch_size: int, device: torch.device) -> None:
        """Start a batch; the float32 per-batch sums are zero here (``end_batch`` leaves them so), so a
        batch's contribution never depends on earlier batches."""
        self.batch_size = batch_size
        self.batch_sample_scores = torch.zeros(batch_size, dtype=torch.float32, device=device)
        self.calls = dict.fromkeys(self.targets, 0)
        self.anchor = torch.zeros((), requires_grad=True, device=device)
        self.touched_rows: dict[str, tuple[int, list[torch.Tensor]]] = {}

    def end_batch(self) -> None:
        """Move the batch's float32 sums into the float64 totals and zero them for the next batch.

        Row-sparse sums (embeddings) move only the rows the batch touched.
        """
        for key, partial in self.scores.items():
            touched = self.touched_rows.get(key)
            if touched is None:
                self.totals[key].add_(partial)
                partial.zero_()
                continue
            width, row_lists = touched
            rows = torch.unique(torch.cat(row_lists))
            table = partial.view(-1, width)
            self.totals[key].view(-1, width).index_add_(0, rows, table[rows].double())
            table[rows] = 0.0

    def discard_batch(self) -> None:
        """Forget a batch's partial sums (a non-finite batch is not added)."""
        for partial in self.scores.values():
            partial.zero_()

    @contextlib.contextmanager
    def installed(self) -> Iterator["_FisherHooks"]:
        handles = []
        try:
            for name, module in self.targets.items():
                rule = rule_for(module)
                handles.append(module.register_forward_pre_hook(self._pre_hook(module)))
                handles.append(module.register_forward_hook(self._forward_hook(name, rule)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre_hook(self, module: nn.Module) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> Optional[tuple]:
            # HF models pass position ids as a broadcast (1, T) tensor: the lookup's output gradient
            # would arrive summed over the batch. Expanding the ids keeps samples apart, same output.
            if isinstance(mod, nn.Embedding) and args and args[0].dim() >= 1:
                ids = args[0]
                if ids.shape[0] == 1 and self.batch_size > 1:
                    return (ids.expand(self.batch_size, *ids.shape[1:]),) + tuple(args[1:])
            return None

        return hook

    def _forward_hook(self, name: str, rule: Rule) -> Callable:
        sink = _Sink(self, name)

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                raise TypeError(f"Fisher engine: {name} must take and return one tensor.")
            x = args[0]
            if x.shape[0] != self.batch_size:
                raise ValueError(
                    f"Fisher engine: the input of {name} has leading size {x.shape[0]}, not the batch size "
                    f"{self.batch_size}; per-sample gradients need batch-first inputs."
                )
            self.calls[name] += 1
            if self.calls[name] > 1:
                raise NotImplementedError(
                    f"{name} is called more than once per forward (shared or tied module): its per-sample "
                    "gradient would need summing across calls before squaring. Exclude it from `target_modules`."
                )
            x = x.detach()
            returned = None
            if not output.requires_grad:
                output = output + self.anchor  # puts the output on the graph; adds exactly 0
                returned = output
            output.register_hook(lambda g: rule(module, x, g.detach(), sink))
            return returned

        return hook


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no parameter gradients; both restored on exit."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in grads.items():
            p.requires_grad_(flag)


def batch_size_of(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    raise ValueError("Fisher batch holds no tensors; pass collated batches (dicts of tensors).")


def check_targets(targets: Mapping[str, nn.Module]) -> None:
    missing = {name: type(m).__name__ for name, m in targets.items() if rule_for(m) is None}
    if missing:
        raise TypeError(
            f"No per-sample Fisher rule for {missing}. Supported types: {[t.__name__ for t in RULES]}; "
            "exclude these modules or register a rule with `peft_fish_ird.fisher.register_rule`."
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
) -> FisherResult:
    """Exact diagonal Fisher of ``targets``' parameters over the samples in ``batches``.

    Args:
        model: called as ``model(**batch_without_labels)``; must return logits (``.logits`` or first item).
        batches: collated batches (dicts of batch-first tensors) holding ``labels``.
        targets: name -> module whose ``weight``/``bias`` are scored (types in ``RULES``).
        fisher: ``"empirical"`` or ``"expected"`` (see module docstring).
        sample_score_masks: ``"<module>.<param>"`` -> bool mask (parameter shape): restricts the
            per-sample scores ``s_n`` to a parameter range. Default: all entries.
        loss_fn: ``loss_fn(logits, labels) -> (B,)`` per-sample losses (empirical only).
        progress: show a tqdm bar (rank 0 only).

    Under ``torch.distributed`` (more than one rank) every rank must pass the same batches; rank r
    back-propagates batches r, r + world, ... and the sums are all-reduced, so all ranks return
    the same result.

    Raises:
        NonFiniteFisherError: a sample's loss or gradient is NaN/inf (its index is named).
    """
    if fisher not in ("empirical", "expected"):
        raise ValueError(f"fisher={fisher!r}: choose 'empirical' or 'expected'.")
    check_targets(targets)
    loss_fn = loss_fn or per_sample_losses
    batches = list(batches)
    sizes = [batch_size_of(b) for b in batches]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    mine = [i for i in range(len(batches)) if i % distributed.world_size() == distributed.rank()]
    hooks = _FisherHooks(targets, sample_score_masks or {})
    device = _device_of(model)
    sample_scores = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    first_bad = torch.tensor([_NO_BAD_SAMPLE], dtype=torch.int64)
    start = time.perf_counter()
    show = progress and distributed.is_main_process()
    with frozen_eval(model), hooks.installed(), torch.enable_grad():
        for i in tqdm(mine, total=len(mine), desc=desc, unit="batch", disable=not show):
            batch = batches[i]
            hooks.begin_batch(sizes[i], device)
            bad = _backward_batch(model, batch, fisher, loss_fn)
            if bad is None:
                bad = _first_non_finite(hooks.batch_sample_scores)
            if bad is not None:  # keep going so every rank reaches the collectives below
                first_bad[0] = min(int(first_bad[0]), offsets[i] + bad)
                hooks.discard_batch()
                continue
            hooks.end_batch()
            sample_scores[offsets[i] : offsets[i] + sizes[i]] = hooks.batch_sample_scores
    _reduce(hooks.totals, sample_scores, first_bad)
    if int(first_bad[0]) != _NO_BAD_SAMPLE:
        raise NonFiniteFisherError(
            f"Fisher sample {int(first_bad[0])} (0-based, in the order drawn) produced a non-finite loss or "
            "gradient. Check that sample's inputs/labels, or run the model in float32."
        )
    result_scores = {}
    for key, flat in hooks.totals.items():
        module_name, param_name = key.rsplit(".", 1)
        result_scores[key] = flat.view(getattr(targets[module_name], param_name).shape)
    return FisherResult(result_scores, sample_scores.cpu(), sum(sizes), time.perf_counter() - start)


_NO_BAD_SAMPLE = 2**62


def _backward_batch(model: nn.Module, batch: Mapping[str, Any], fisher: str, loss_fn: LossFn) -> Optional[int]:
    """Forward and backward of one batch; returns the in-batch index of a non-finite loss, if any."""
    labels = batch.get("labels")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = output_logits(model(**inputs))
    if fisher == "empirical":
        losses = loss_fn(logits, labels)
        bad = _first_non_finite(losses)
        if bad is None:
            losses.sum().backward()
        return bad
    log_p = class_log_probs(logits)
    bad = _first_non_finite(log_p.sum(-1))
    if bad is not None:
        return bad
    weight = log_p.detach().exp().sqrt()  # sum_c p_c g_c^2 = sum_c (sqrt(p_c) g_c)^2
    for c in range(log_p.shape[-1]):
        (-(log_p[:, c] * weight[:, c])).sum().backward(retain_graph=c < log_p.shape[-1] - 1)
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
    shared, home = distributed.collective_tensor(sample_scores)
    distributed.all_reduce_(shared)
    sample_scores.copy_(shared.to(home))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _first_non_finite(values: torch.Tensor) -> Optional[int]:
    bad = ~torch.isfinite(values)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None
