"""Hooks that run each target's Fisher rule on its input and output gradient during backward."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Optional

import torch
from torch import nn

from ..layer_types import FisherRule, layer_type_for
from .sink import Sink
from .tied import TiedUses, tied_aliases


class FisherHooks:
    """The running sums of one Fisher pass; installs forward hooks on the targets that attach an
    output-gradient hook running the target type's Fisher rule."""

    def __init__(
        self, targets: Mapping[str, nn.Module], masks: Mapping[str, torch.Tensor], per_sample: bool = True
    ) -> None:
        self.targets = dict(targets)
        self.per_sample = per_sample  # False: only the per-parameter sums (no s_n; plain FISH needs none)
        self.masks = {k: m.reshape(-1).float() for k, m in masks.items()}
        self.scores: dict[str, torch.Tensor] = {}
        aliases = tied_aliases(self.targets)  # later uses of a shared tensor -> its first use's key
        self.tied_homes: dict[str, TiedUses] = {}
        for name, module in self.targets.items():
            for p, spec in layer_type_for(module).specs_of(module).items():
                key = f"{name}.{p}"
                if key in aliases:
                    continue
                self.scores[key] = torch.zeros(spec.numel(), dtype=torch.float32, device=spec.device)
                if key in aliases.values():
                    self.tied_homes[key] = TiedUses(spec.shape)
        # every use of a tied tensor (the first one included) reports to the tensor's collector
        self.tied: dict[str, TiedUses] = {key: self.tied_homes[home] for key, home in aliases.items()}
        self.tied.update(self.tied_homes)
        unknown = set(self.masks) - set(self.scores)
        if unknown:
            tied = {k: aliases[k] for k in unknown if k in aliases}
            raise KeyError(
                f"sample_score_masks name parameters that are not targets: {sorted(unknown)}"
                + (f" (tied: name them by their first use, {tied})" if tied else "")
            )
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
        for uses in self.tied_homes.values():
            uses.clear()

    def flush_tied(self) -> None:
        """After each backward pass: sum every tied tensor's uses per sample, square, add (``tied.py``)."""
        for home, uses in self.tied_homes.items():
            samples = self.batch_sample_scores if self.per_sample else None
            uses.flush(self.scores[home], samples, self.masks.get(home), self.batch_size)

    @contextlib.contextmanager
    def installed(self) -> Iterator["FisherHooks"]:
        handles = []
        try:
            for name, module in self.targets.items():
                entry = layer_type_for(module)
                if entry.fisher_input is not None:
                    handles.append(module.register_forward_pre_hook(self._pre_hook(entry.fisher_input)))
                hook = self._forward_hook(name, entry.fisher_rule)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre_hook(self, fisher_input: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable:
        def hook(module: nn.Module, args: tuple) -> Optional[tuple]:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = fisher_input(args[0], self.batch_size)
            return None if x is args[0] else (x, *args[1:])

        return hook

    def _forward_hook(self, name: str, rule: FisherRule) -> Callable:
        sink = Sink(self, name)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Optional[torch.Tensor]:
            one_tensor = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
            if not one_tensor or not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"Fisher engine: {name} must take one tensor argument and return one tensor (it got "
                    f"{len(args)} positional and {sorted(kwargs)} keyword arguments): the per-sample rules see "
                    "only that input. Exclude it from `target_modules`."
                )
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
