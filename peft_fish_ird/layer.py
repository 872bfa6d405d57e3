"""Sparse-delta tuner layer: per targeted module, indices into each flattened parameter and a
trainable float32 values vector. The effective parameter is ``W0.flatten().index_add(idx, values)``.

The layer never knows how its entries were chosen (that is ``selection.py`` / ``model.py``).
Base tensors are never written by training; ``merge`` writes them and ``unmerge`` restores the
overwritten entries bit for bit from a backup taken at merge time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from .layer_types import ParamSpec, describe_supported, in_out_features, is_supported, layer_type_for

PARAM_NAMES = ("weight", "bias")  # the per-adapter containers below; a layer type uses a subset


class UnpreparedAdapterError(RuntimeError):
    """Raised when a FishIRD adapter is trained or saved before ``prepare`` chose its mask."""


def unprepared_message(adapter_name: str) -> str:
    return (
        f"FishIRD adapter {adapter_name!r} has no sparse mask yet. Call "
        f"`peft_model.prepare(train_dataset, data_collator=collator)` after `get_peft_model` and before "
        "building the optimizer / Trainer, or load a saved adapter with `PeftModel.from_pretrained`."
    )


def quantized_merge_message(library: str) -> str:
    return (
        f"Cannot merge a FishIRD adapter into a {library} base: the merged weight would have to be re-quantized, "
        "which rounds the sparse update away. Keep the adapter unmerged (its forward is exact), or dequantize "
        "the base first: `peft_fish_ird.dequantize_bnb(peft_model)` swaps the quantized layers for float ones, "
        "then `merge_and_unload()`."
    )


def is_supported_layer(module: nn.Module) -> bool:
    """Whether FishIRD can adapt ``module`` (its type is in ``layer_types``' registry)."""
    return is_supported(module)


class FishIRDLayer(BaseTunerLayer):
    """State and bookkeeping of the sparse delta (PEFT's tuner-layer contract)."""

    adapter_layer_names = ("fishird_weight_values", "fishird_bias_values")
    other_param_names = (
        "fishird_weight_indices",
        "fishird_bias_indices",
        "fishird_prepared",
        "_trainable_intent",
        "keep_effective_weight",
    )

    def __init__(self, base_layer: nn.Module, tied: Optional[dict[str, "FishIRDLayer"]] = None, **kwargs: Any) -> None:
        self.base_layer = base_layer
        # parameter name -> the layer holding the entries of a tensor this base shares with another
        # targeted module (tied weights): one mask and one delta, applied at every use. A plain dict,
        # so the owner is not registered as a submodule a second time.
        self._tied: dict[str, FishIRDLayer] = dict(tied or {})
        self.layer_type = layer_type_for(base_layer)  # the registry's entry, looked up once
        self.fishird_weight_values = nn.ParameterDict({})
        self.fishird_bias_values = nn.ParameterDict({})
        self.fishird_weight_indices = BufferDict({}, persistent=True)
        self.fishird_bias_indices = BufferDict({}, persistent=True)
        self.fishird_prepared: dict[str, bool] = {}
        self._trainable_intent: dict[str, bool] = {}
        # adapter -> FishIRDConfig.keep_effective_weight (the Linear fast path's memory/speed choice)
        self.keep_effective_weight: dict[str, bool] = {}
        self._merge_backups: dict[str, dict[str, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features = in_out_features(base_layer)

    # ----------------------------------------------------------------- structure
    def base_param_names(self) -> tuple[str, ...]:
        """Names of the base layer's parameters whose entries this layer holds (``weight``, maybe
        ``bias``): what it fills, saves, loads and merges. A tied parameter's entries are held by
        its first use (``tied_owner``) and are left out here."""
        base = self.get_base_layer()
        return tuple(n for n in self.layer_type.parameters_of(base) if n not in self._tied)

    def entry_param_names(self) -> tuple[str, ...]:
        """Every base parameter with entries in this layer's forward, tied ones included."""
        return tuple(self.layer_type.parameters_of(self.get_base_layer()))

    def tied_owner(self, param_name: str) -> Optional["FishIRDLayer"]:
        """The layer holding ``param_name``'s entries when the tensor is tied to another use, else None."""
        return self._tied.get(param_name)

    def param_spec(self, param_name: str) -> ParamSpec:
        """Logical shape, dtype and device of a base parameter (a packed weight's unpacked shape)."""
        return self.layer_type.specs_of(self.get_base_layer())[param_name]

    def values(self, param_name: str) -> nn.ParameterDict:
        """Per-adapter values of a parameter (a tied one's are its owner's: the same Parameter)."""
        holder = self._tied.get(param_name, self)
        return getattr(holder, f"fishird_{param_name}_values")

    def indices(self, param_name: str) -> BufferDict:
        holder = self._tied.get(param_name, self)
        return getattr(holder, f"fishird_{param_name}_indices")

    def num_entries(self, adapter_name: str) -> int:
        """Entries this layer's forward applies (a tied parameter's included)."""
        return sum(int(self.indices(p)[adapter_name].numel()) for p in self.entry_param_names())

    def is_prepared(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` has its mask here (and, for tied parameters, at their owner)."""
        own = self.fishird_prepared.get(adapter_name, False) or not self.base_param_names()
        return own and all(owner.is_prepared(adapter_name) for owner in self._tied.values())

    def update_layer(self, adapter_name: str, inference_mode: bool = False, **kwargs: Any) -> None:
        """Add ``adapter_name`` with no entries yet (``prepare`` or a checkpoint fills them)."""
        for name in self.base_param_names():
            device = self.param_spec(name).device
            self.values(name)[adapter_name] = nn.Parameter(torch.zeros(0, dtype=torch.float32, device=device))
            self.indices(name)[adapter_name] = torch.zeros(0, dtype=torch.int64, device=device)
        self.fishird_prepared[adapter_name] = False
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # PEFT switches requires_grad through these; an empty values vector must never require grad
    # (DDP would wait for a gradient that no forward produces), and a values vector created later
    # by ``set_entries`` must get the state PEFT last asked for.
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for adapter in self.fishird_prepared:
            self._trainable_intent[adapter] = adapter in names and not inference_mode
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_empty_values()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for adapter in names:
            if adapter in self.fishird_prepared:
                self._trainable_intent[adapter] = requires_grad
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._freeze_empty_values()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        self._freeze_empty_values()

    def _freeze_empty_values(self) -> None:
        for name in PARAM_NAMES:
            for values in self.values(name).values():
                if values.numel() == 0:
                    values.requires_grad_(False)

    def use_base_dtype(self, adapter_name: str) -> None:
        """Hold ``adapter_name``'s values in the base parameters' dtype instead of float32 (PEFT's
        ``autocast_adapter_dtype=False``); later ``set_entries`` calls keep that dtype."""
        for name in self.base_param_names():
            dtype, old = self.param_spec(name).dtype, self.values(name)[adapter_name]
            if dtype.is_floating_point and old.dtype != dtype:
                self.values(name)[adapter_name] = nn.Parameter(old.detach().to(dtype), requires_grad=old.requires_grad)

    def set_entries(self, adapter_name: str, param_name: str, indices: torch.Tensor) -> None:
        """Give ``adapter_name`` the entries ``indices`` (into the flattened parameter) with zero deltas.

        Creates a new values Parameter (float32, or the dtype ``use_base_dtype`` chose), so an
        optimizer built before this call does not see it.
        """
        if param_name in self._tied:
            raise ValueError(
                f"{param_name} is tied to another targeted module, which holds its entries: set them there."
            )
        base_param = self.param_spec(param_name)
        indices = _checked_indices(indices, base_param.numel(), f"{param_name} of {type(self.get_base_layer())}")
        self.indices(param_name)[adapter_name] = indices.to(base_param.device)
        previous = self.values(param_name).get(adapter_name)
        dtype = torch.float32 if previous is None else previous.dtype
        self.values(param_name)[adapter_name] = nn.Parameter(
            torch.zeros(indices.numel(), dtype=dtype, device=base_param.device),
            requires_grad=self._trainable_intent.get(adapter_name, False) and indices.numel() > 0,
        )

    def _resize_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        """Load-state-dict pre-hook: resize placeholders to the checkpoint's entry counts and validate them.

        Entry counts are decided by ``prepare``, after the layer was built, so a fresh model's
        placeholders are empty; without this hook ``load_state_dict`` fails with a size mismatch.
        """
        for adapter_name in list(self.fishird_prepared):
            for name in self.base_param_names():
                key_i = f"{prefix}fishird_{name}_indices.{adapter_name}"
                key_v = f"{prefix}fishird_{name}_values.{adapter_name}"
                if key_i not in state_dict or key_v not in state_dict:
                    continue
                idx, vals = state_dict[key_i], state_dict[key_v]
                where = f"{prefix.rstrip('.')}.{name}"
                numel = self.param_spec(name).numel()
                if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1 or vals.shape != idx.shape:
                    raise ValueError(
                        f"Checkpoint entries for {where} are malformed (indices {tuple(idx.shape)} {idx.dtype}, "
                        f"values {tuple(vals.shape)}): the adapter file is corrupt or not a FishIRD adapter."
                    )
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                    raise ValueError(
                        f"Checkpoint entry indices for {where} reach {int(idx.max())}, but this base model's "
                        f"parameter has only {numel} entries: the adapter was trained on a base model with "
                        "different shapes. Load it onto the base model it was trained with."
                    )
                idx = state_dict[key_i] = _checked_indices(idx, numel, where)  # int64 in memory (saved as int32)
                if self.values(name)[adapter_name].shape != vals.shape:
                    self.set_entries(adapter_name, name, idx)
                self.fishird_prepared[adapter_name] = True

    # ----------------------------------------------------------------- delta
    def get_delta_weight(self, adapter: str, param_name: str = "weight") -> torch.Tensor:
        """Dense delta of one parameter (shape of the base parameter, its dtype)."""
        spec = self.param_spec(param_name)
        delta = torch.zeros(spec.numel(), dtype=spec.dtype, device=spec.device)
        idx = self.indices(param_name)[adapter]
        delta.index_add_(0, idx, self.values(param_name)[adapter].to(spec.dtype))
        return delta.view(spec.shape)

    def effective_param(self, param_name: str, adapter_names: list[str]) -> torch.Tensor:
        """``W0 + sum of the adapters' sparse deltas``, differentiable w.r.t. the values only."""
        base_param = self.layer_type.dense_param(self.get_base_layer(), param_name)
        flat = base_param.reshape(-1)
        for name in adapter_names:
            idx = self.indices(param_name)[name]
            if idx.numel():
                flat = flat.index_add(0, idx, self.values(param_name)[name].to(base_param.dtype))
        return flat.view_as(base_param)

    # ----------------------------------------------------------------- merge
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the adapters' deltas into the base tensors (``safe_merge`` checks for NaN/inf first)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.fishird_prepared:
                continue
            if not self.is_prepared(adapter):
                raise UnpreparedAdapterError(unprepared_message(adapter))
            for owner in self._tied.values():  # the shared tensor is written once, by its owner
                if adapter not in owner.merged_adapters:
                    owner.merge(safe_merge=safe_merge, adapter_names=[adapter])
            if self.layer_type.quantized is not None:
                raise TypeError(quantized_merge_message(self.layer_type.quantized.library))
            backups = {}
            for name in self.base_param_names():
                base_param = getattr(self.get_base_layer(), name)
                idx = self.indices(name)[adapter]
                flat = base_param.data.view(-1)
                new_vals = flat[idx] + self.values(name)[adapter].detach().to(base_param.dtype)
                if safe_merge and not torch.isfinite(new_vals).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                backups[name] = flat[idx].clone()
                flat[idx] = new_vals
            self._merge_backups[adapter] = backups
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo ``merge``: restore the overwritten base entries exactly (not by subtraction)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            backups = self._merge_backups.pop(adapter, {})
            for name, backup in backups.items():
                flat = getattr(self.get_base_layer(), name).data.view(-1)
                flat[self.indices(name)[adapter]] = backup
        for owner in self._tied.values():
            if owner.merged:
                owner.unmerge()


class FishIRDModule(nn.Module, FishIRDLayer):
    """A supported module (a type in ``layer_types``) with sparse deltas on its parameters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, inference_mode: bool = False, **kwargs: Any):
        super().__init__()
        FishIRDLayer.__init__(self, base_layer, **kwargs)
        if not is_supported_layer(base_layer):
            raise TypeError(
                f"FishIRD cannot target {type(base_layer).__name__}: supported module types are "
                f"{describe_supported()}. Remove it from `target_modules`."
            )
        packed = [n for n, spec in self.layer_type.specs_of(base_layer).items() if not spec.dtype.is_floating_point]
        if packed:
            raise TypeError(
                f"FishIRD cannot target {type(base_layer).__name__}: its {packed} are stored as "
                f"{getattr(base_layer, packed[0]).dtype}, a quantization FishIRD does not know. Supported quantized "
                "bases are bitsandbytes 4-bit and 8-bit; load the model in float (or dequantize it) otherwise."
            )
        self._active_adapter = adapter_name
        self._layout_cache: dict[str, tuple[torch.Tensor, Any]] = {}
        self.use_fast_path = True  # False: the slow obvious path (dense effective weight + autograd)
        self.update_layer(adapter_name, inference_mode=inference_mode)
        self.register_load_state_dict_pre_hook(_resize_pre_hook)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.fishird_prepared]
        if self.training and torch.is_grad_enabled():
            for adapter in active:
                if not self.is_prepared(adapter):
                    raise UnpreparedAdapterError(unprepared_message(adapter))
        active = [a for a in active if self.num_entries(a)]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        entry = self.layer_type
        if self.use_fast_path and len(active) == 1 and self._fast_path_applies(entry):
            return entry.fast_forward(self, x, active[0])
        if entry.quantized is not None:  # slow path of a packed base: base(x) + x @ dense delta^T (+ b)
            return self.base_layer(x, *args, **kwargs) + self._dense_delta_term(x, active)
        params = {name: self.effective_param(name, active) for name in self.entry_param_names()}
        with _shadowing_views_replaced(self.base_layer, params):
            return functional_call(self.base_layer, params, (x, *args), kwargs)

    def _dense_delta_term(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        """``x @ D_w^T + D_b`` with the adapters' dense deltas (the quantized types' slow path)."""
        names = self.entry_param_names()
        deltas = {n: sum(self.get_delta_weight(a, n).float() for a in adapters) for n in names}
        return F.linear(x.float(), deltas["weight"], deltas.get("bias")).to(x.dtype)

    def _fast_path_applies(self, entry: Any) -> bool:
        """The type's fast forward covers this call: it has one, and the base weights are frozen."""
        if entry.fast_forward is None or not entry.fast_path_applies(self.base_layer):
            return False
        # base weights being trained too: let autograd form their gradients
        return not any(p.requires_grad for p in self.base_layer.parameters(recurse=False))

    def cached_layout(self, adapter: str, indices: torch.Tensor, build: Any) -> Any:
        """Layouts derived from the indices (for fast forwards), rebuilt whenever the index tensor is replaced."""
        entry = self._layout_cache.get(adapter)
        if entry is None or entry[0] is not indices:
            with torch.inference_mode(False):  # a layout first built under inference_mode must serve training too
                entry = (indices, build())
            self._layout_cache[adapter] = entry
        return entry[1]

    def __repr__(self) -> str:
        return "fishird." + super().__repr__()


@contextlib.contextmanager
def _shadowing_views_replaced(module: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Also replace plain tensors in ``module.__dict__`` that shadow the parameters ``functional_call`` swaps.

    FSDP (``use_orig_params=True``) puts its unsharded views there during forward; ``self.weight``
    finds them before the registered parameters, so without this the deltas would be ignored.
    """
    saved = {name: module.__dict__[name] for name in params if name in module.__dict__}
    try:
        module.__dict__.update({name: params[name] for name in saved})
        yield
    finally:
        module.__dict__.update(saved)


def _resize_pre_hook(module: FishIRDModule, state_dict: dict, prefix: str, *args: Any) -> None:
    module._resize_from_state_dict(state_dict, prefix)


def _checked_indices(indices: torch.Tensor, numel: int, where: str) -> torch.Tensor:
    """Validate entry indices: 1-D, integer, strictly increasing, inside ``[0, numel)``."""
    if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"Entry indices for {where} must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}."
        )
    indices = indices.to(torch.int64)
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= numel:
            raise ValueError(
                f"Entry indices for {where} must lie in [0, {numel}); got [{int(indices.min())}, {int(indices.max())}]."
            )
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError(f"Entry indices for {where} must be strictly increasing (sorted, no duplicates).")
    return indices
