"""FISH masks for any torch model, without PEFT: Fisher scores, the top-k mask, a bridge to SHiRA.

``fisher_scores`` runs the package's Fisher engine (``fisher.compute_fisher``, the exact sum of
squared per-sample gradients, ``F_j = sum_n g_nj**2``, float64) on ``num_samples`` examples drawn
from ``data`` with ``seed`` (``data.fisher_batches``) and returns it keyed by parameter name, as in
``model.named_parameters()``. ``fish_mask`` turns the scores into sorted int64 flat indices with
``selection.select``: by default one global top-k, ``k = int(keep_ratio * total parameters of the
model)``, ties going to the earlier entry (dict order, then flat index), as FISH does.

Unlike ``FishIRDModel.prepare``, nothing here knows of a task head: by default every module with
a Fisher rule is a candidate, the classifier included. Pass ``target_modules`` to leave it (or
anything else) out; the budget still counts every parameter of the model.

``shira_mask_fn`` hands such a mask to PEFT's SHiRA, whose ``ShiraConfig.mask_fn`` is called as
``mask_fn(base_layer, r, **kwargs)`` for each adapted ``nn.Linear`` and must return a 0/1 tensor of
the weight's shape, dtype and device holding exactly ``r * (in_features + out_features)`` ones.
``shira_budget`` gives those per-layer counts, so ``fish_mask(..., budget=shira_budget(...))``
picks, in every adapted layer, the entries of highest Fisher score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from .data import check_sequence_length, fisher_batches, move_to
from .fisher import compute_fisher, rule_for
from .fisher.tied import check_every_use_targeted, tied_aliases
from .layer_types import describe_supported, layer_type_for
from .layer_types.bnb import packed_numel
from .selection import BUDGETS, select, sparse_budget, top_k_positions

DEFAULT_KEEP_RATIO = 0.005
TargetModules = Optional[Union[str, Sequence[str]]]
Budget = Union[str, Mapping[str, int]]
MaskFn = Callable[..., torch.Tensor]


def fisher_scores(
    model: nn.Module,
    data: Any,
    *,
    data_collator: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None,
    num_samples: int = 1024,
    seed: int = 0,
    batch_size: int = 16,
    fisher: str = "empirical",
    target_modules: TargetModules = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of a model's parameters: parameter name -> float64 tensor of its shape.

    Args:
        model: any ``nn.Module`` called as ``model(**inputs)`` returning logits (a plain
            ``transformers`` model needs no PEFT wrapper); run on the device it is on.
        data: a ``datasets.Dataset``, a list of tokenized examples (dicts) or a ``DataLoader``
            (see ``data.fisher_batches``); ``fisher="empirical"`` needs a ``labels`` column.
        data_collator: batches the drawn examples (default ``transformers.default_data_collator``;
            pass ``DataCollatorWithPadding(tokenizer)`` for text of varying length).
        num_samples, seed: how many examples are drawn, and with which seed.
        batch_size: examples per Fisher batch (the result does not depend on it).
        fisher: ``"empirical"`` (true labels) or ``"expected"`` (classification).
        target_modules: which modules' ``weight``/``bias`` are scored. None: every module with a
            Fisher rule (Linear, Embedding, LayerNorm, GPT-2 Conv1D, ...), the task head included.
            A list: module names or name suffixes (``["query", "value"]``), as PEFT matches them; a
            string: a regular expression the whole module name must match.
        progress: show a progress bar.

    Returns:
        ``F_j = sum_n g_nj**2`` summed over the drawn samples, each sample's gradient that of its
        own loss (as with a batch of one), keyed like ``model.named_parameters()``.
    """
    targets = resolve_targets(model, target_modules)
    return _scores(model, data, targets, data_collator, num_samples, seed, batch_size, fisher, progress)


def fish_mask(
    model: nn.Module,
    data: Any,
    *,
    keep_ratio: Optional[float] = None,
    budget: Budget = "global",
    data_collator: Optional[Callable[[list[dict[str, Any]]], dict[str, Any]]] = None,
    num_samples: int = 1024,
    seed: int = 0,
    batch_size: int = 16,
    fisher: str = "empirical",
    target_modules: TargetModules = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """The FISH mask: parameter name -> sorted int64 flat indices of the entries to train.

    Args:
        keep_ratio: share of the model's parameters to keep (default 0.005):
            ``k = int(keep_ratio * sum(p.numel() for p in model.parameters()))``.
        budget: ``"global"`` (FISH: one top-k over all candidate entries), ``"per_module"`` (k split
            over parameters in proportion to their sizes, then a top-k in each), ``"column_capped"``
            (``per_module`` with each input feature of a matrix capped at its even share), or a mapping
            parameter name -> count: that many highest-scored entries of each named parameter and
            none elsewhere (``keep_ratio`` must then be left unset; with ``target_modules`` unset
            only the named parameters' modules are scored). ``shira_budget`` builds SHiRA's.
        Other arguments: as ``fisher_scores``.

    Deterministic: the same model, data and seed give the same mask (ties go to the earlier entry,
    in ``named_parameters`` order, then flat index). Parameters of the targets that get no entry
    map to an empty index tensor (not with a mapping ``budget``: only its names are returned).
    """
    args = (data_collator, num_samples, seed, batch_size, fisher, progress)
    if isinstance(budget, Mapping):
        return _mask_with_counts(model, data, budget, keep_ratio, target_modules, args)
    if budget not in BUDGETS:
        raise ValueError(
            f"budget={budget!r}: choose one of {BUDGETS} or a mapping parameter name -> number of entries."
        )
    keep_ratio = DEFAULT_KEEP_RATIO if keep_ratio is None else keep_ratio
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio={keep_ratio!r}: pass the share of parameters to train, in (0, 1].")
    targets = resolve_targets(model, target_modules)
    total = sum(packed_numel(p) or p.numel() for p in model.parameters())
    k = sparse_budget(total, 0, keep_ratio, head_in_budget=False)
    candidates = sum(packed_numel(p) or p.numel() for p in _target_params(targets).values())
    if k > candidates:
        raise ValueError(
            f"keep_ratio={keep_ratio} of the model's {total} parameters is k={k} entries, more than the {candidates} "
            "entries of the targeted modules: lower keep_ratio or target more modules."
        )
    axes = {f"{name}.weight": layer_type_for(m).input_axis for name, m in targets.items()}
    return select(_scores(model, data, targets, *args), k, budget, input_axes=axes)


def _mask_with_counts(model, data, budget, keep_ratio, target_modules, args) -> dict[str, torch.Tensor]:
    """``fish_mask`` with a per-parameter count mapping: each named parameter's own top entries."""
    if keep_ratio is not None:
        raise ValueError(
            "fish_mask got both keep_ratio and a per-parameter budget mapping, which sets every count itself: "
            "leave keep_ratio unset."
        )
    if target_modules is None:
        missing = [name for name in budget if name not in dict(model.named_parameters())]
        if missing:
            raise ValueError(f"budget names parameters the model does not have: {missing}.")
        target_modules = sorted({name.rsplit(".", 1)[0] for name in budget})
    targets = resolve_targets(model, target_modules)
    counts = _check_counts(model, targets, budget)
    scores = _scores(model, data, targets, *args)
    return {name: top_k_positions(scores[name].reshape(-1).double(), n) for name, n in counts.items()}


def shira_budget(model: nn.Module, r: int, target_modules: Union[str, Sequence[str]]) -> dict[str, int]:
    """SHiRA's entry counts: ``"<layer>.weight"`` -> ``r * (in_features + out_features)`` for each
    ``nn.Linear`` matched by ``target_modules`` (the same value as in ``ShiraConfig``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r={r!r}: SHiRA's r must be a positive integer.")
    targets = resolve_targets(model, target_modules)
    not_linear = {name: type(m).__name__ for name, m in targets.items() if not isinstance(m, nn.Linear)}
    if not_linear:
        raise ValueError(f"SHiRA adapts only nn.Linear layers; target_modules also match {not_linear}.")
    counts = {}
    for name, module in targets.items():
        out_features, in_features = module.weight.shape
        counts[f"{name}.weight"] = r * (in_features + out_features)
        if counts[f"{name}.weight"] > module.weight.numel():
            raise ValueError(
                f"r={r} gives {name} ({out_features}x{in_features}) r * (in + out) = {counts[f'{name}.weight']} "
                f"entries, more than its {module.weight.numel()} weights (SHiRA refuses that too): lower r."
            )
    return counts


def shira_mask_fn(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> MaskFn:
    """A ``ShiraConfig.mask_fn`` that gives SHiRA the entries of a FISH mask.

    One line, on the model *before* ``get_peft_model`` wraps it::

        config = ShiraConfig(r=r, mask_type="fish", target_modules=targets)  # any name but "random"
        config.mask_fn = shira_mask_fn(model, fish_mask(model, data, budget=shira_budget(model, r, targets)))

    The function finds the layer SHiRA passes (``mask_fn(base_layer, r, **kwargs)``) by identity in
    ``model`` and returns a 0/1 tensor of its weight's shape, dtype and device. SHiRA trains exactly
    ``r * (in_features + out_features)`` entries per layer, so a mask with another count there (e.g.
    a global FISH mask, whose budget is spread unevenly) is refused with that count.
    """
    names = {module: name for name, module in model.named_modules()}
    modules = dict(model.named_modules())
    wrong = [
        key
        for key in masks
        if not key.endswith(".weight") or not isinstance(modules.get(key[: -len(".weight")]), nn.Linear)
    ]
    if wrong:
        raise ValueError(
            f"SHiRA adapts only the weights of nn.Linear layers; these masks would be dropped: {wrong}. Build the "
            "mask with fish_mask(model, data, budget=shira_budget(model, r, target_modules))."
        )

    def mask_fn(base_layer: nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        name = names.get(base_layer)
        if name is None:
            raise ValueError(
                f"SHiRA asked for the mask of a {type(base_layer).__name__} that is not part of the model given to "
                "shira_mask_fn: build the mask function from the same model object that get_peft_model wraps."
            )
        key = f"{name}.weight"
        if key not in masks:
            raise ValueError(
                f"SHiRA adapts {name}, but the FISH mask has no entries for {key} (it covers {sorted(masks)}): use the "
                "same target_modules in ShiraConfig and shira_budget."
            )
        weight = base_layer.weight
        out_features, in_features = weight.shape
        required = r * (in_features + out_features)
        indices = masks[key]
        if indices.numel() != required:
            raise ValueError(
                f"SHiRA trains exactly r * (in_features + out_features) entries of each adapted layer (LoRA's "
                f"parameter count): {name} is {out_features}x{in_features} with r={r}, so {r} * ({in_features} + "
                f"{out_features}) = {required}, but the FISH mask has {indices.numel()} entries there. A global "
                f"FISH mask spreads its budget unevenly; build it with budget=shira_budget(model, r={r}, "
                "target_modules) instead."
            )
        mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        mask[indices.to(weight.device)] = 1
        return mask.view(weight.shape)

    return mask_fn


def resolve_targets(model: nn.Module, target_modules: TargetModules) -> dict[str, nn.Module]:
    """Module name -> module to score; every target must have a Fisher rule, every name must match."""
    modules = dict(model.named_modules())
    if target_modules is None:
        targets = {name: m for name, m in modules.items() if rule_for(m) is not None and _has_params(m)}
    elif isinstance(target_modules, str):
        targets = {name: m for name, m in modules.items() if re.fullmatch(target_modules, name)}
        if not targets:
            raise ValueError(f"target_modules={target_modules!r} matches no module name of the model.")
    else:
        wanted = list(target_modules)
        unknown = [t for t in wanted if not any(_matches(name, t) for name in modules)]
        if unknown:
            example = [name for name, m in modules.items() if rule_for(m) is not None][:3]
            raise ValueError(
                f"target_modules {unknown} match no module of the model; pass module names or their last parts, "
                f"e.g. {example}."
            )
        targets = {name: m for name, m in modules.items() if any(_matches(name, t) for t in wanted)}
    no_rule = {name: type(m).__name__ for name, m in targets.items() if rule_for(m) is None}
    if no_rule:
        raise ValueError(
            f"target_modules match modules the Fisher engine has no rule for: {no_rule}. Name the layers inside them "
            f"({describe_supported()}), or register the type with `peft_fish_ird.register_layer_type`."
        )
    if not targets:
        raise ValueError(f"The model has no module with a Fisher rule ({describe_supported()}).")
    check_every_use_targeted(model, targets)
    return targets


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith(f".{target}")


def _has_params(module: nn.Module) -> bool:
    return bool(layer_type_for(module).parameters_of(module))


def _target_params(targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``"<module>.<weight|bias>"`` -> the parameter, for the parameters the Fisher engine scores; a
    tensor shared by several targets (tied weights) once, under its first use's name, as the engine
    keys it."""
    aliases = tied_aliases(targets)  # the engine's own rule for which use names a shared tensor
    return {
        f"{name}.{p}": tensor
        for name, module in targets.items()
        for p, tensor in layer_type_for(module).parameters_of(module).items()
        if f"{name}.{p}" not in aliases
    }


def _check_counts(model: nn.Module, targets: Mapping[str, nn.Module], budget: Mapping[str, int]) -> dict[str, int]:
    params = _target_params(targets)
    unknown = [name for name in budget if name not in params]
    if unknown:
        raise ValueError(
            f"budget names parameters that are not scored: {unknown}. Scored are {sorted(params)[:5]}...; use "
            "names as in model.named_parameters() and matching target_modules."
        )
    for name, count in budget.items():
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= params[name].numel():
            raise ValueError(f"budget[{name!r}]={count!r}: pass a number of entries in [0, {params[name].numel()}].")
    return dict(budget)


def _scores(
    model: nn.Module,
    data: Any,
    targets: Mapping[str, nn.Module],
    data_collator: Optional[Callable],
    num_samples: int,
    seed: int,
    batch_size: int,
    fisher: str,
    progress: bool,
) -> dict[str, torch.Tensor]:
    if fisher not in ("empirical", "expected"):
        raise ValueError(f"fisher={fisher!r}: choose 'empirical' or 'expected'.")
    drawn = fisher_batches(
        data, model=model, num_samples=num_samples, seed=seed, batch_size=batch_size, data_collator=data_collator
    )
    if fisher == "empirical" and any(b.get("labels") is None for b in drawn.batches):
        raise ValueError(
            "The Fisher batches have no 'labels': fisher='empirical' needs the true labels. Add a 'labels' (or "
            "'label') column, or use fisher='expected' for classification."
        )
    check_sequence_length(model, drawn.batches)
    device = next(model.parameters()).device
    batches = [move_to(b, device) for b in drawn.batches]
    result = compute_fisher(model, batches, targets, fisher, progress=progress, desc="Fisher", sample_scores=False)
    return dict(result.scores)
