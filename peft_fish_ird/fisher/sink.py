"""The accumulation sink: receives one layer's per-sample gradients from its Fisher rule and adds
their squares to the running per-parameter sums and per-sample scores while they are in cache."""

from __future__ import annotations

from typing import Any

import torch

from ..zero_positions import live_spans

MATRIX_CHUNK_ELEMENTS = 786_432  # ~3 MB of float32 per block: stays in cache on this CPU
PER_SAMPLE_GEMM_MIN_ELEMENTS = 262_144  # from this weight size on, per-sample GEMM + addcmul is faster


class Sink:
    """Receives one layer's per-sample gradients and adds their squares to the running sums.

    ``engine`` is the pass's ``hooks.FisherHooks``, which holds the sums. A tensor shared by several
    targets (tied weights) goes to its ``tied.TiedUses`` collector instead, which squares the sum
    of the uses after the backward pass."""

    def __init__(self, engine: Any, module_name: str) -> None:
        self.engine = engine
        self.module_name = module_name

    def dense(self, param_name: str, per_sample_grad: torch.Tensor) -> None:
        """``per_sample_grad``: ``(B, numel)`` float32, row b = sample b's gradient (flattened)."""
        key = f"{self.module_name}.{param_name}"
        if key in self.engine.tied:
            self.engine.tied[key].dense(per_sample_grad)
            return
        sq = per_sample_grad.square_()
        self.engine.scores[key].add_(sq.sum(0))
        if not self.engine.per_sample:
            return
        mask = self.engine.masks.get(key)
        self.engine.batch_sample_scores.add_(sq @ mask if mask is not None else sq.sum(1))

    def matrix(self, param_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Per-sample gradient ``a[n]^T b[n]`` (rows x cols) for ``a`` (B, T, rows), ``b`` (B, T, cols).

        Large weights: one GEMM per sample over its live positions (``live_spans``: padding cut), squared
        and accumulated by a fused ``addcmul_``. Small ones: blocks of rows for all samples
        (``MATRIX_CHUNK_ELEMENTS``) over the batch's live positions, squared and summed while in cache.
        Never the whole ``B x rows x cols`` tensor. Per-sample scores are read off the same blocks
        while they are in cache; the Gram identity ``||a^T b||^2 = sum((a a^T) * (b b^T))``
        avoids that pass but costs ``B T^2 (rows + cols)`` multiply-adds, more than the blocks' own
        ``B rows cols`` squares for any T above ~16 (at 64 tokens it was most of the engine's
        overhead over a plain pass). Without per-sample scores (``engine.per_sample`` False: plain
        FISH needs none) that pass is skipped (about 1% of the engine's time on MiniLM at 64 tokens).
        """
        key = f"{self.module_name}.{param_name}"
        if key in self.engine.tied:
            self.engine.tied[key].matrix(a, b)
            return
        batch, rows, cols = a.shape[0], a.shape[2], b.shape[2]
        scores = self.engine.scores[key].view(rows, cols)
        mask = self.engine.masks.get(key)
        mask = None if mask is None else mask.view(rows, cols)
        a_t = a.transpose(1, 2)
        per_sample = torch.zeros(batch, dtype=torch.float32, device=a.device)
        want = self.engine.per_sample
        spans = live_spans(a, b)
        if rows * cols >= PER_SAMPLE_GEMM_MIN_ELEMENTS:
            # large weights: one GEMM per sample over its live positions, squared and added in one fused pass
            for n, (start, stop) in enumerate(spans):
                if stop <= start:
                    continue  # no live position: a zero gradient adds nothing (its score stays 0)
                block = a_t[n, :, start:stop] @ b[n, start:stop]
                scores.addcmul_(block, block)
                if not want:
                    continue
                flat = block.reshape(-1)
                if mask is None:
                    per_sample[n] = torch.dot(flat, flat)
                else:
                    per_sample[n] = torch.dot(flat.square_(), mask.reshape(-1))
        else:
            # small weights: all samples at once over the batch's live positions (e.g. only the first token
            # in a classifier's last layer), in row blocks
            low, high = min(start for start, _ in spans), max(stop for _, stop in spans)
            a_t, b = a_t[..., low:high], b[:, low:high]
            step = max(1, MATRIX_CHUNK_ELEMENTS // (batch * cols))
            for start in range(0, rows if high > low else 0, step):
                block = torch.bmm(a_t[:, start : start + step], b)
                block.square_()
                scores[start : start + step].add_(block.sum(0))
                if not want:
                    continue
                flat = block.reshape(batch, -1)
                per_sample.add_(flat @ mask[start : start + step].reshape(-1) if mask is not None else flat.sum(1))
        if want:
            self.engine.batch_sample_scores.add_(per_sample)

    def rows(self, param_name: str, samples: torch.Tensor, rows: torch.Tensor, row_grads: torch.Tensor) -> None:
        """Sparse per-sample gradients: sample ``samples[u]`` has gradient ``row_grads[u]`` in row ``rows[u]``."""
        key = f"{self.module_name}.{param_name}"
        if key in self.engine.tied:
            self.engine.tied[key].rows_of(samples, rows, row_grads)
            return
        width = row_grads.shape[1]
        sq = row_grads.square()
        self.engine.scores[key].view(-1, width).index_add_(0, rows, sq)
        self.engine.touched_rows.setdefault(key, (width, []))[1].append(rows)
        if not self.engine.per_sample:
            return
        mask = self.engine.masks.get(key)
        per_row = (sq * mask.view(-1, width)[rows]).sum(1) if mask is not None else sq.sum(1)
        self.engine.batch_sample_scores.index_add_(0, samples, per_row)
