"""Where inside each weight matrix do FISH's entries go? (issue 12: why a random mask beats FISH at 0.5%)

For every Linear weight (out x in) of all-MiniLM-L6-v2's encoder and pooler, the masks of
``per_module`` FISH (with and without head probing), ``column_capped`` FISH and a random mask are
summarised by how they spread over the matrix's **input features** (columns):

* ``features_touched``: share of the input features with at least one entry;
* ``top1pct_share``: share of the matrix's entries in its 1% most-used input features;
* ``max_feature_fill``: the most entries in one input feature, as a share of its rows.

Means over the matrices, per head seed (0, 1, 2) and keep ratio (0.2%, 0.5%); Fisher over 128
training sentences of the movie task (``common.py``'s setting). Writes
``results/mask_concentration.json`` and ``.md``; about 5 minutes on one CPU thread.

    python benchmarks/diagnostics/mask_concentration.py
"""

from __future__ import annotations

import json

import numpy as np
from common import RESULTS, fishird_model, layer_masks, load_base, load_data, provenance

CONDITIONS = {
    "fish per_module": {"budget": "per_module"},
    "fish per_module + head probe": {
        "budget": "per_module",
        "head_probe_steps": 48,
        "head_probe_lr": 0.01,
        "head_probe_batch_size": 16,
    },
    "fish column_capped": {"budget": "column_capped"},
    "random": {"selection": "random", "budget": "per_module"},
}
HEAD_SEEDS, KEEP_RATIOS = (0, 1, 2), (0.002, 0.005)


def spread(model) -> dict[str, float]:
    """Mean over the encoder's and pooler's Linear weights of the three spread measures."""
    import torch

    masks = layer_masks(model.base_model)
    rows = []
    for name, layer in model.base_model.fishird_layers("default").items():
        base = layer.get_base_layer()
        if not isinstance(base, torch.nn.Linear) or "embeddings" in name:
            continue
        idx = masks[f"{name}.weight"]
        if not len(idx):
            continue
        per_feature = np.bincount(idx % base.in_features, minlength=base.in_features)
        top = np.sort(per_feature)[::-1][: max(1, base.in_features // 100)]
        rows.append(((per_feature > 0).mean(), top.sum() / len(idx), per_feature.max() / base.out_features))
    mean = np.mean(rows, axis=0)
    return {
        "features_touched": round(float(mean[0]), 4),
        "top1pct_share": round(float(mean[1]), 4),
        "max_feature_fill": round(float(mean[2]), 4),
    }


def main() -> None:
    data = load_data("movie")
    runs = []
    for condition, extra in CONDITIONS.items():
        for ratio in KEEP_RATIOS:
            for seed in HEAD_SEEDS:
                model, _ = fishird_model(load_base(data, seed), data, ratio, 128, 0, **extra)
                runs.append({"condition": condition, "keep_ratio": ratio, "head_seed": seed, **spread(model)})
                print(runs[-1], flush=True)
    (RESULTS / "mask_concentration.json").write_text(json.dumps({"meta": provenance(), "runs": runs}, indent=1) + "\n")
    lines = [
        "# Mask concentration over input features (Linear weights of MiniLM's encoder and pooler)",
        "",
        "`python benchmarks/diagnostics/mask_concentration.py`; mean over matrices, then mean ± std over",
        "head seeds 0, 1, 2. Movie task, Fisher over 128 training sentences.",
        "",
        "| condition | keep | features touched | entries in the top 1% of features | most-filled feature "
        "(share of rows) |",
        "|---|---|---|---|---|",
    ]
    for condition in CONDITIONS:
        for ratio in KEEP_RATIOS:
            sel = [r for r in runs if r["condition"] == condition and r["keep_ratio"] == ratio]
            cells = [
                f"{np.mean([r[m] for r in sel]):.2f} ± {np.std([r[m] for r in sel]):.2f}"
                for m in ("features_touched", "top1pct_share", "max_feature_fill")
            ]
            lines.append(f"| {condition} | {ratio:.1%} | " + " | ".join(cells) + " |")
    (RESULTS / "mask_concentration.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
