"""Tied weights in the Fisher pass: one tensor used by several targeted modules.

A causal LM's input embedding and output head often hold the same tensor. Sample n's gradient of
that tensor is the SUM of its uses' gradients, ``G_n = E_n + L_n`` (embedding lookup + output
projection), and the Fisher needs ``sum_n G_n**2``, which is not ``sum_n E_n**2 + sum_n L_n**2``:
the cross term ``2 E_n L_n`` is missing from a per-use sum.

So each use's Fisher rule hands its per-sample gradient to a ``TiedUses`` collector instead of the
squaring sink (the rules are unchanged; ``Sink`` routes the call). After each backward pass,
``flush`` forms ``G_n`` block by block of rows, from every use's own form (``matrix``: the
``a^T b`` factors; ``rows``: a lookup's row-sparse sums; ``dense``), squares it and adds it to the
one score of the tensor: memory stays at one block of ``B x rows x cols``. The factors of every
use are held until the end of that backward (for an output head, its ``B x T x vocab`` output
gradient: the size of the logits).

The tensor's score lives under its first use's key (``"<module>.<param>"`` in the targets'
order); later uses are aliases of it and have no score of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from ..layer_types import layer_type_for

TIED_BLOCK_ELEMENTS = 4 * 786_432  # per-sample gradient elements formed at once (all samples of a block)


def tied_aliases(targets: Mapping[str, nn.Module]) -> dict[str, str]:
    """``"<module>.<param>"`` of every later use of a tensor shared by targets -> its first use's key."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, module in targets.items():
        entry = layer_type_for(module)
        for param_name, tensor in entry.parameters_of(module).items():
            key = f"{name}.{param_name}"
            home = first.setdefault(id(tensor), key)
            if home != key:
                if entry.quantized is not None:
                    raise NotImplementedError(
                        f"{key} is a packed ({entry.quantized.library}) tensor shared with {home}: tied quantized "
                        "weights are not supported. Leave one of the two modules out of `target_modules`."
                    )
                aliases[key] = home
    return aliases


def check_every_use_targeted(model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
    """Refuse a targeted tensor that a module outside the targets also uses: its per-sample gradient
    would miss that use, so its score (and a delta applied at one use only) would be wrong."""
    mine = {
        id(tensor): f"{name}.{param_name}"
        for name, module in targets.items()
        for param_name, tensor in layer_type_for(module).parameters_of(module).items()
    }
    targeted = {id(m) for m in targets.values()}
    for name, module in model.named_modules():
        if id(module) in targeted:
            continue
        for tensor in module.parameters(recurse=False):
            if id(tensor) in mine:
                raise ValueError(
                    f"{mine[id(tensor)]} is shared with {name!r} (tied weights), which is not a target: its "
                    "per-sample gradient sums both uses, so scoring one use alone would be wrong. Target both "
                    "modules (the default targets do) or neither."
                )


class TiedUses:
    """Collects one batch's per-sample gradients of a shared tensor from each of its uses, then sums
    them and adds their squares to the tensor's score (see the module docstring)."""

    def __init__(self, shape: torch.Size) -> None:
        numel = int(torch.Size(shape).numel())
        self.rows = int(shape[0]) if len(shape) >= 1 and shape[0] > 0 else 1
        self.cols = numel // self.rows
        self.parts: list[tuple] = []

    def dense(self, per_sample_grad: torch.Tensor) -> None:
        self.parts.append(("dense", per_sample_grad.reshape(per_sample_grad.shape[0], self.rows, self.cols)))

    def matrix(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape[2] != self.rows or b.shape[2] != self.cols:
            raise ValueError(
                f"A use of a tied tensor ({self.rows} x {self.cols}) gave a per-sample gradient of shape "
                f"{a.shape[2]} x {b.shape[2]}: the two modules lay the shared tensor out differently."
            )
        self.parts.append(("matrix", a.transpose(1, 2), b))

    def rows_of(self, samples: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor) -> None:
        if row_grads.shape[1] != self.cols:
            raise ValueError(f"A row-sparse use of a tied tensor has width {row_grads.shape[1]}, not {self.cols}.")
        order = torch.argsort(rows, stable=True)
        self.parts.append(("rows", samples[order], rows[order], row_grads[order]))

    def clear(self) -> None:
        self.parts.clear()

    def flush(
        self, scores: torch.Tensor, sample_scores: Optional[torch.Tensor], mask: Optional[torch.Tensor], batch: int
    ) -> None:
        """Add ``sum_n (sum over uses of g_n)**2`` to ``scores`` (flat) and each sample's masked sum
        to ``sample_scores`` (None: no per-sample scores wanted); forget the parts."""
        if not self.parts:
            return
        table = scores.view(self.rows, self.cols)
        weights = None if mask is None else mask.view(self.rows, self.cols)
        step = max(1, TIED_BLOCK_ELEMENTS // (batch * self.cols))
        per_sample = torch.zeros(batch, dtype=torch.float32, device=scores.device)
        for start in range(0, self.rows, step):
            stop = min(self.rows, start + step)
            block = torch.zeros(batch, stop - start, self.cols, dtype=torch.float32, device=scores.device)
            for part in self.parts:
                self._add_part(block, part, start, stop)
            block.square_()
            table[start:stop].add_(block.sum(0))
            if sample_scores is None:
                continue
            flat = block.reshape(batch, -1)
            per_sample.add_(flat @ weights[start:stop].reshape(-1) if weights is not None else flat.sum(1))
        if sample_scores is not None:
            sample_scores.add_(per_sample)
        self.parts.clear()

    @staticmethod
    def _add_part(block: torch.Tensor, part: tuple, start: int, stop: int) -> None:
        kind = part[0]
        if kind == "matrix":
            _, a_t, b = part
            block.baddbmm_(a_t[:, start:stop], b)
        elif kind == "dense":
            block.add_(part[1][:, start:stop])
        else:
            _, samples, rows, grads = part
            lo, hi = (int(i) for i in torch.searchsorted(rows, torch.tensor([start, stop], device=rows.device)))
            if hi > lo:
                block.index_put_((samples[lo:hi], rows[lo:hi] - start), grads[lo:hi], accumulate=True)
