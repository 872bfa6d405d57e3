"""Fast forward/backward of a weight plus a sparse delta, computing only what training needs.

Training the values vector needs, per step, the input gradient and the gradient of the values
- never the dense weight gradient that autograd would form for ``W0 + scatter(values)``. For a
matrix weight M (``nn.Linear``: ``y = x M^T``; GPT-2 ``Conv1D``: ``y = x M``) the values'
gradient is ``(A^T B)[r_e, c_e]`` (Linear: A = grad_out, B = x; Conv1D: A = x, B = grad_out),
formed only where needed: per layer, the cheapest of a dense product plus a gather, a product
over only the rows or columns that hold entries plus a gather (Fisher masks cluster in few
columns), or a sampled dense-dense product (SDDMM, ``torch.sparse.sampled_addmm``) evaluated
only at the selected positions. Which one is fastest depends on the machine, so by default the
first backward pass of each pattern times every candidate on its real operands and keeps the
fastest (an autotune, cached by shape, entry counts, token count and device: similar layers are
timed once). ``FISHIRD_AUTOTUNE=0`` falls back to ``choose_strategy``, a cost model fitted on one
CPU: deterministic, but it picked the fastest way for only 27 of 37 layers on another machine.
The strategies agree up to float rounding, so with the autotune two runs may differ by rounding.
Positions whose output gradient is zero for the whole batch on the CPU (a CLS classifier's last
layer, the prompt under a completion-only loss; ``zero_positions.py``) are cut from both products.
The custom function saves x; the input gradient's effective weight is rebuilt in backward from the
frozen base (one transient weight at a time, ~3% of a MiniLM step at 1024 tokens, less at more
tokens), or kept from forward when ``FishIRDConfig.keep_effective_weight`` asks for speed over memory.

Embedding: ``W0[ids] + D[pos(ids)]`` where D is a compact table holding only the rows that
have entries (plus a zero row), so neither forward nor backward touches a vocab-sized delta.

The slow obvious path (``layer.effective_param`` + ``functional_forward``) is the reference the
tests compare these against.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .zero_positions import batch_live_span

# Cost model of the values' gradient, in units of one dense-GEMM output (fitted to the real
# MiniLM masks on this CPU; `python -m benchmarks.speed` reports how often it picks the fastest).
SDDMM_COST_PER_ENTRY = 3.0  # sampled_addmm: per selected entry
SDDMM_COST_PER_LINE = 110.0  # sampled_addmm: per row of the larger dimension (a transposed copy, CSR walk)
SUBSET_COST_FACTOR = 1.3  # a product over gathered rows/columns, plus the gather of its result
STRATEGIES = ("dense", "rows", "cols", "sddmm")
AUTOTUNE_ENV = "FISHIRD_AUTOTUNE"  # "0": no timing, the cost model chooses
AUTOTUNE_STRATEGY = "auto"  # a pattern whose strategy is timed at its first use
# timed calls per candidate (the best counts): near-ties of sub-millisecond products need a few to
# come out the same way twice (2 calls left 1-2 of MiniLM's 37 layers 5-6% off the fastest)
AUTOTUNE_TIMED_CALLS = 4
_TUNED: dict[tuple, str] = {}  # autotune cache: pattern key -> fastest strategy


def autotune_enabled() -> bool:
    """Whether patterns built without a strategy are autotuned (``FISHIRD_AUTOTUNE`` is not ``"0"``)."""
    return os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


def clear_autotune_cache() -> None:
    """Forget the autotune's choices (the next pattern of every kind is timed again)."""
    _TUNED.clear()


def _bucket(n: int) -> int:
    """``n`` on a quarter-octave scale: patterns this close share an autotune choice."""
    return -1 if n <= 0 else round(4 * math.log2(n))


def gradient_costs(k: int, rows: int, cols: int, used_rows: int, used_cols: int) -> dict[str, float]:
    """Estimated cost, in dense-GEMM output entries, of each way to form the values' gradient.

    * ``dense``: the whole ``a^T b`` product, then a gather;
    * ``rows`` / ``cols``: the product over only the rows / columns that hold entries, then a
      gather. Fisher masks cluster hard (BERT's outlier input features put a query layer's
      entries in 1-14 of 384 columns), so this is often a small fraction of the dense product;
    * ``sddmm``: ``torch.sparse.sampled_addmm`` at the k entries.
    """
    return {
        "dense": float(rows * cols),
        "rows": SUBSET_COST_FACTOR * used_rows * cols,
        "cols": SUBSET_COST_FACTOR * rows * used_cols,
        "sddmm": SDDMM_COST_PER_ENTRY * k + SDDMM_COST_PER_LINE * max(rows, cols),
    }


def choose_strategy(k: int, rows: int, cols: int, used_rows: int, used_cols: int) -> str:
    """The cheapest entry of ``gradient_costs`` (ties: the order of ``STRATEGIES``)."""
    costs = gradient_costs(k, rows, cols, used_rows, used_cols)
    return min(STRATEGIES, key=lambda name: costs[name])


@dataclass
class MatrixPattern:
    """Where the entries of a (rows x cols) matrix sit, laid out for the chosen gradient strategy.

    ``sub``: the rows (``rows`` strategy) or columns (``cols``) that hold entries; ``gather``: each
    entry's position in the flattened product the strategy forms; ``crow``/``col``/``order``: the
    CSR pattern for ``sddmm``, oriented so its rows run along the larger dimension.
    """

    flat: torch.Tensor
    rows: int
    cols: int
    strategy: str
    sub: Optional[torch.Tensor] = field(default=None, repr=False)
    gather: Optional[torch.Tensor] = field(default=None, repr=False)
    transposed: bool = False
    crow: Optional[torch.Tensor] = field(default=None, repr=False)
    col: Optional[torch.Tensor] = field(default=None, repr=False)
    order: Optional[torch.Tensor] = field(default=None, repr=False)
    used: tuple[int, int] = (0, 0)  # rows and columns that hold entries
    timings: Optional[dict[str, float]] = field(default=None, repr=False)  # the autotune's seconds, if it timed

    @classmethod
    def build(cls, flat: torch.Tensor, rows: int, cols: int, strategy: Optional[str] = None) -> "MatrixPattern":
        """The layout for ``strategy``; ``"auto"``: timed at first use (``tune``); ``None``: ``"auto"``
        unless ``FISHIRD_AUTOTUNE=0``, then the cost model's choice now."""
        r, c = flat // cols, flat % cols
        used_rows, row_pos = torch.unique(r, return_inverse=True)
        used_cols, col_pos = torch.unique(c, return_inverse=True)
        used = (used_rows.numel(), used_cols.numel())
        if strategy is None:
            strategy = AUTOTUNE_STRATEGY if autotune_enabled() else choose_strategy(flat.numel(), rows, cols, *used)
        if strategy == AUTOTUNE_STRATEGY:
            return cls(flat, rows, cols, AUTOTUNE_STRATEGY, used=used)
        elif strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r}: choose one of {STRATEGIES}.")
        pattern = cls._layout(flat, rows, cols, strategy, r, c, used_rows, row_pos, used_cols, col_pos)
        pattern.used = used
        return pattern

    @classmethod
    def _layout(cls, flat, rows, cols, strategy, r, c, used_rows, row_pos, used_cols, col_pos) -> "MatrixPattern":
        if strategy == "dense":
            return cls(flat, rows, cols, strategy, gather=flat)
        if strategy == "rows":
            return cls(flat, rows, cols, strategy, sub=used_rows, gather=row_pos * cols + c)
        if strategy == "cols":
            return cls(flat, rows, cols, strategy, sub=used_cols, gather=r * used_cols.numel() + col_pos)
        transposed = rows < cols
        if transposed:  # pattern of M^T: its rows are M's columns
            order = torch.argsort(c * rows + r)
            lead, other, n_lead = c[order], r[order], cols
        else:
            order, lead, other, n_lead = None, r, c, rows
        crow = torch.zeros(n_lead + 1, dtype=torch.int64, device=flat.device)
        crow[1:] = torch.bincount(lead, minlength=n_lead).cumsum(0)
        return cls(flat, rows, cols, strategy, transposed=transposed, crow=crow, col=other.contiguous(), order=order)

    def autotune_key(self, tokens: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """What an autotune choice is cached under: the shape exactly, entry and used-line counts and
        the token count on a quarter-octave scale, the device type and the dtype."""
        k = self.flat.numel()
        return (self.rows, self.cols, _bucket(k), *(_bucket(u) for u in self.used), _bucket(tokens), device.type, dtype)

    def tune(self, a: torch.Tensor, b: torch.Tensor) -> str:
        """Choose the strategy of an ``"auto"`` pattern: time each candidate on these operands (one
        warm-up call, then the best of ``AUTOTUNE_TIMED_CALLS`` timed calls, the candidates taking
        turns) unless a similar pattern already chose; become that layout. Returns the choice."""
        key = self.autotune_key(a.shape[0], a.device, a.dtype)
        choice = _TUNED.get(key)
        # a cached choice needs only its own layout; timing needs every candidate's
        candidates = {
            s: MatrixPattern.build(self.flat, self.rows, self.cols, s) for s in ([choice] if choice else STRATEGIES)
        }
        if choice is None:
            timings = {s: math.inf for s in STRATEGIES}
            for repeat in range(1 + AUTOTUNE_TIMED_CALLS):
                for name, pattern in candidates.items():
                    _synchronize(a.device)
                    start = time.perf_counter()
                    pattern.sampled(a, b)
                    _synchronize(a.device)
                    if repeat:  # the first round warms caches and kernels up
                        timings[name] = min(timings[name], time.perf_counter() - start)
            choice = min(STRATEGIES, key=lambda name: timings[name])
            _TUNED[key] = choice
            self.timings = timings
        chosen = candidates[choice]
        for f in ("strategy", "sub", "gather", "transposed", "crow", "col", "order"):
            setattr(self, f, getattr(chosen, f))
        return choice

    def sampled(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``(a^T b)`` at the pattern's entries, in ``flat`` order; a: (N, rows), b: (N, cols), float32."""
        if self.strategy == AUTOTUNE_STRATEGY:
            self.tune(a, b)
        if self.strategy == "dense":
            return (a.t() @ b).reshape(-1)[self.gather]
        if self.strategy == "rows":
            return (a[:, self.sub].t() @ b).reshape(-1)[self.gather]
        if self.strategy == "cols":
            return (a.t() @ b[:, self.sub]).reshape(-1)[self.gather]
        k = self.flat.numel()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse CSR is a beta API in torch 2.13
            # transposed views: sampled_addmm lays its operands out itself (an explicit copy was no faster)
            if not self.transposed:
                shape, m1, m2 = (self.rows, self.cols), a.t(), b
            else:
                shape, m1, m2 = (self.cols, self.rows), b.t(), a
            pattern = torch.sparse_csr_tensor(
                self.crow, self.col, torch.zeros(k, dtype=a.dtype, device=a.device), shape
            )
            values = torch.sparse.sampled_addmm(pattern, m1, m2, beta=0.0).values()
        if self.order is None:
            return values
        out = torch.empty_like(values)
        out[self.order] = values
        return out


class _SparseDeltaMatmul(torch.autograd.Function):
    """y = x M_eff^T + b_eff (Linear) or x M_eff + b_eff (Conv1D), M_eff = M0 + scatter(values)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pattern, w_values, b_idx, b_values, conv1d, keep_weight):  # noqa: D401
        w_eff = _effective(weight, pattern.flat, w_values)
        b_eff = bias if (bias is None or b_idx is None) else _effective(bias, b_idx, b_values)
        if conv1d:
            x2 = x.reshape(-1, x.shape[-1])
            out = x2 @ w_eff if b_eff is None else torch.addmm(b_eff, x2, w_eff)
            out = out.view(*x.shape[:-1], w_eff.shape[1])
        else:
            out = F.linear(x, w_eff, b_eff)
        # the input gradient needs M_eff. keep_weight: hold this step's copy until backward (one
        # weight of memory per layer, the whole model's worth at once); otherwise rebuild it there
        # from the frozen base (saved by reference) - the same index_add, so the same bits.
        keep = keep_weight and ctx.needs_input_grad[0]
        ctx.save_for_backward(x, w_eff if keep else weight, w_values, b_idx)
        ctx.pattern, ctx.conv1d, ctx.kept = pattern, conv1d, keep
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, w_values, b_idx = ctx.saved_tensors
        pattern, conv1d = ctx.pattern, ctx.conv1d
        grad_x = grad_w = grad_b = None
        # positions where grad_out is zero for the whole batch add nothing and get a zero input gradient
        span = batch_live_span(grad_out)
        if span is not None and span[0] == span[1]:  # no live position: every gradient is zero
            return _zero_grads(ctx, x, w_values, b_idx)
        g_live, x_live = (grad_out, x) if span is None else (grad_out[:, span[0] : span[1]], x[:, span[0] : span[1]])
        # 2-D from here on: grad_out often arrives non-contiguous (attention's head permutes), and a
        # 3-D non-contiguous matmul takes a batched path with the weight expanded per sample
        g2 = g_live.reshape(-1, g_live.shape[-1])
        x2 = x_live.reshape(-1, x_live.shape[-1])
        if ctx.needs_input_grad[0]:
            w_eff = weight if ctx.kept else _effective(weight, pattern.flat, w_values)
            w_eff = w_eff.to(grad_out.dtype)  # autocast: grads may be bf16
            grad_live = (g2 @ (w_eff.t() if conv1d else w_eff)).view(*x_live.shape[:-1], -1).to(x.dtype)
            if span is None:
                grad_x = grad_live
            else:
                grad_x = x.new_zeros(x.shape)
                grad_x[:, span[0] : span[1]] = grad_live
        if ctx.needs_input_grad[4]:
            a, b = (x2, g2) if conv1d else (g2, x2)
            grad_w = pattern.sampled(a.float(), b.float()).to(w_values.dtype)
        if b_idx is not None and ctx.needs_input_grad[6]:
            grad_b = g2.float().sum(0)[b_idx].to(w_values.dtype)
        return grad_x, None, None, None, grad_w, None, grad_b, None, None


def _zero_grads(ctx, x: torch.Tensor, w_values: torch.Tensor, b_idx: Optional[torch.Tensor]) -> tuple:
    """``_SparseDeltaMatmul.backward``'s result for an output gradient that is zero everywhere."""
    grad_x = x.new_zeros(x.shape) if ctx.needs_input_grad[0] else None
    grad_w = torch.zeros_like(w_values) if ctx.needs_input_grad[4] else None
    grad_b = w_values.new_zeros(b_idx.shape) if b_idx is not None and ctx.needs_input_grad[6] else None
    return grad_x, None, None, None, grad_w, None, grad_b, None, None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _effective(param: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return param.reshape(-1).index_add(0, flat, values.to(param.dtype)).view_as(param)


def sparse_delta_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    pattern: MatrixPattern,
    w_values: torch.Tensor,
    b_idx: Optional[torch.Tensor],
    b_values: Optional[torch.Tensor],
    conv1d: bool,
    keep_weight: bool = False,
) -> torch.Tensor:
    """Forward of a Linear/Conv1D with sparse deltas on weight (and bias); see module docstring.

    ``keep_weight``: keep the step's effective weight for backward instead of rebuilding it there
    (``FishIRDConfig.keep_effective_weight``): a little faster, one weight of memory per layer."""
    return _SparseDeltaMatmul.apply(x, weight, bias, pattern, w_values, b_idx, b_values, conv1d, keep_weight)


@dataclass
class EmbeddingRows:
    """Compact-row layout of an embedding's entries: which rows have entries, and where each entry sits."""

    lookup: torch.Tensor  # vocab -> row position in the compact table (last row: zeros)
    row_pos: torch.Tensor
    col: torch.Tensor
    num_rows: int
    padding_pos: Optional[int]

    @classmethod
    def build(cls, flat: torch.Tensor, num_embeddings: int, dim: int, padding_idx: Optional[int]) -> "EmbeddingRows":
        rows, cols = flat // dim, flat % dim
        unique_rows, row_pos = torch.unique(rows, return_inverse=True)
        lookup = torch.full((num_embeddings,), unique_rows.numel(), dtype=torch.int64, device=flat.device)
        lookup[unique_rows] = torch.arange(unique_rows.numel(), device=flat.device)
        # nn.Embedding gives the padding row no gradient; so does the compact table's copy of it
        padding_pos = None if padding_idx is None else int(lookup[padding_idx])
        return cls(lookup, row_pos, cols, unique_rows.numel(), padding_pos)


def sparse_delta_embedding(
    ids: torch.Tensor, base: nn.Embedding, rows: EmbeddingRows, values: torch.Tensor
) -> torch.Tensor:
    """``base(ids) + delta[ids]`` with the delta held as a compact table of the rows with entries."""
    weight = base.weight
    table = torch.zeros(rows.num_rows + 1, weight.shape[1], dtype=values.dtype, device=weight.device)
    table = table.index_put((rows.row_pos, rows.col), values)
    delta = F.embedding(rows.lookup[ids], table, rows.padding_pos)
    return F.embedding(ids, weight, base.padding_idx) + delta.to(weight.dtype)


class _SparseDeltaOnly(torch.autograd.Function):
    """``x @ scatter(values)^T (+ bias delta)``: the sparse term alone, for a base whose weight is
    packed (quantized) and runs its own forward. The delta is held as a CSR matrix (entries are
    sorted row-major), so neither pass forms a dense (out x in) matrix."""

    @staticmethod
    def forward(ctx, x, pattern, w_values, b_idx, b_values):  # noqa: D401
        delta = _delta_csr(pattern, w_values.detach().float())
        x2 = x.reshape(-1, x.shape[-1]).float()
        out = torch.sparse.mm(delta, x2.t()).t()
        if b_idx is not None:
            out = out.index_add(1, b_idx, b_values.detach().float().expand(out.shape[0], -1))
        ctx.save_for_backward(x, w_values, b_idx)
        ctx.pattern, ctx.delta = pattern, delta  # backward's input gradient reuses this step's CSR delta
        return out.view(*x.shape[:-1], pattern.rows).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_values, b_idx = ctx.saved_tensors
        pattern = ctx.pattern
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.sparse.mm(ctx.delta.t(), g2.t()).t().reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = pattern.sampled(g2, x.reshape(-1, x.shape[-1]).float()).to(w_values.dtype)
        if b_idx is not None and ctx.needs_input_grad[4]:
            grad_b = g2.sum(0)[b_idx].to(w_values.dtype)
        return grad_x, None, grad_w, None, grad_b


def _delta_csr(pattern: MatrixPattern, values: torch.Tensor) -> torch.Tensor:
    rows = pattern.flat // pattern.cols
    crow = torch.zeros(pattern.rows + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.bincount(rows, minlength=pattern.rows).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is a beta API in torch 2.13
        return torch.sparse_csr_tensor(crow, pattern.flat % pattern.cols, values, (pattern.rows, pattern.cols))


def sparse_delta_only(
    x: torch.Tensor,
    pattern: MatrixPattern,
    w_values: torch.Tensor,
    b_idx: Optional[torch.Tensor],
    b_values: Optional[torch.Tensor],
) -> torch.Tensor:
    """The sparse term of a quantized Linear (``pattern``'s entries must be sorted); see ``_SparseDeltaOnly``."""
    return _SparseDeltaOnly.apply(x, pattern, w_values, b_idx, b_values)
