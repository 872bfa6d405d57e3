"""Data-free initial masks (``FishIRDConfig.mask_init``), chosen when the adapter is injected.

``"fisher"`` (the default) leaves the adapter without a mask until ``prepare``. The data-free
choices give it one at ``get_peft_model`` / ``add_adapter`` time, of the size ``prepare`` would
pick (``k = sparse_budget(keep_ratio of all parameters, head in budget as configured)``, counted
over the whole model once every target is wrapped):

* ``"random"``: k entries drawn uniformly over all targeted parameters, seeded by ``seed``
  (SHiRA's random mask; the same draw as ``selection="random"``);
* ``"magnitude"``: the k entries of largest ``|W0|`` over all targeted parameters, one global
  top-k (Super-Tuning's criterion), ties to the earlier entry.

The adapter then counts as prepared, with a ``SelectionRecord`` (method ``"random"`` /
``"magnitude"``, fisher ``"none"``) so it saves and loads; with ``init_weights=False`` its values
are drawn from ``N(0, 0.1^2)`` (torch's global RNG), else they start at zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import torch

from .ird import IRDRound
from .layer import FishIRDLayer
from .prepare import PrepareJob, Selected, fill_masks
from .selection import select_global, sparse_budget

INIT_VALUES_STD = 0.1  # init_weights=False: small non-zero deltas, for tests


def magnitude_mask(params: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Sorted flat indices of the k entries of largest ``|W|`` over all ``params`` (one global top-k)."""
    return select_global({key: p.detach().abs() for key, p in params.items()}, k)


def init_data_free_mask(tuner: Any, adapter: str) -> None:
    """Give ``adapter`` its data-free mask (``config.mask_init``), if it asks for one.

    Nothing happens for ``mask_init="fisher"``, or when the config was read from a saved adapter
    that already has a record (the checkpoint's mask is loaded next).
    """
    config = tuner.peft_config[adapter]
    if config.mask_init == "fisher":
        return
    if config.selection_record is not None and getattr(config, "_fishird_loaded", False):
        return
    layers: dict[str, FishIRDLayer] = tuner.fishird_layers(adapter)
    if not layers:
        return
    start = time.perf_counter()
    job = PrepareJob(tuner, adapter, None, progress=False)
    total, head = tuner.count_parameters()
    k = sparse_budget(total, head, config.keep_ratio, config.head_in_budget)
    if config.mask_init == "random":
        selected = job.random(k)
    else:
        params = {
            f"{name}.{p}": getattr(layer.get_base_layer(), p)
            for name, layer in layers.items()
            for p in layer.base_param_names()
        }
        n_params = sum(t.numel() for t in params.values())
        selected = Selected(magnitude_mask(params, k), [], {}, [IRDRound(1, 0, n_params, None, 0.0)])
    fill_masks(adapter, layers, selected.masks)
    if not config.init_weights:
        _draw_values(adapter, layers)
    tuner.__dict__.setdefault("_fishird_initial_values", {})[adapter] = _values_fingerprint(adapter, layers)
    record = job.record(selected, total, head, k, time.perf_counter() - start)
    record = dataclasses.replace(
        record,
        method=config.mask_init,
        fisher="none",
        num_samples_requested=0,
        settings={"mask_init": config.mask_init, "init_weights": config.init_weights},
    )
    config.selection_record = record.to_dict()


def values_trained(tuner: Any, adapter: str, layers: dict[str, FishIRDLayer]) -> bool:
    """Whether ``adapter``'s values moved: some are non-zero, and they are not the draw that
    ``init_weights=False`` made at injection (a fresh data-free adapter may be re-selected freely)."""
    if not any(
        bool(layer.values(p)[adapter].detach().any()) for layer in layers.values() for p in layer.base_param_names()
    ):
        return False
    initial = tuner.__dict__.get("_fishird_initial_values", {}).get(adapter)
    return initial is None or initial != _values_fingerprint(adapter, layers)


def _values_fingerprint(adapter: str, layers: dict[str, FishIRDLayer]) -> str:
    digest = hashlib.sha256()
    for name in sorted(layers):
        for p in layers[name].base_param_names():
            digest.update(layers[name].values(p)[adapter].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _draw_values(adapter: str, layers: dict[str, FishIRDLayer]) -> None:
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.base_param_names():
                values = layer.values(p)[adapter]
                values.copy_(torch.randn(values.shape, dtype=values.dtype, device=values.device) * INIT_VALUES_STD)
