"""The generic torch.func fallback: other leaf modules with a weight/bias stay mask candidates,
their Fisher equals the batch-size-1 loop, and trained entries merge exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from peft_fish_ird import FishIRDConfig
from peft_fish_ird.fisher import compute_fisher
from peft_fish_ird.layer_types import layer_type_for
from peft_fish_ird.layer_types.generic import GENERIC_MAX_ENTRIES, GENERIC_NAME
from peft_fish_ird.reference import fisher_loop


class GemmaStyleRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(dim))
        self.eps = 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Scale(nn.Module):
    """A parameter the adapter layer cannot hold (not called weight/bias): stays unsupported."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale


class Net(nn.Module):
    """Conv1d -> GroupNorm -> PReLU -> Gemma-style norm -> Scale -> Linear head, batch first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(3, 6, kernel_size=3, padding=1)
        self.group_norm = nn.GroupNorm(2, 6)
        self.act = nn.PReLU(6)
        self.norm = GemmaStyleRMSNorm(8)
        self.scale = Scale(8)
        self.head = nn.Linear(48, 3)

    def forward(self, x, labels=None):
        h = self.act(self.group_norm(self.conv(x)))
        h = self.scale(self.norm(h))
        logits = self.head(h.reshape(h.shape[0], -1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def batches(n: int = 12, size: int = 4, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [{"x": x[i : i + size], "labels": y[i : i + size]} for i in range(0, n, size)]


def test_leaf_modules_with_weight_or_bias_get_the_generic_rule_and_others_do_not():
    net = Net()
    for module in (net.conv, net.group_norm, net.act, net.norm):
        assert layer_type_for(module).name == GENERIC_NAME, type(module).__name__
    assert layer_type_for(net.head).name == "Linear"  # a registered type wins
    assert layer_type_for(net.scale) is None  # parameter not called weight/bias
    assert layer_type_for(net) is None  # not a leaf
    assert layer_type_for(nn.Linear(4, 4)).name == "Linear"
    big = nn.Conv1d(1, 1, 1)
    big.weight = nn.Parameter(torch.zeros(GENERIC_MAX_ENTRIES + 1, 1, 1))
    assert layer_type_for(big) is None  # too big to copy per sample


def test_generic_fisher_equals_the_batch_size_one_loop():
    net = Net().eval()
    targets = {"conv": net.conv, "group_norm": net.group_norm, "act": net.act, "norm": net.norm, "head": net.head}
    fast = compute_fisher(net, batches(), targets, progress=False)
    slow = fisher_loop(net, batches(), targets)
    assert fast.scores.keys() == slow.scores.keys()
    for key, ref in slow.scores.items():
        assert ref.abs().max() > 0, key
        torch.testing.assert_close(fast.scores[key].double(), ref.double(), rtol=1e-5, atol=1e-9, msg=key)
    torch.testing.assert_close(fast.sample_scores, slow.sample_scores, rtol=1e-5, atol=0)


def test_default_targets_include_generic_modules_and_warn_only_about_the_rest(caplog):
    with caplog.at_level(logging.WARNING):
        model = get_peft_model(Net(), FishIRDConfig(keep_ratio=0.2, num_samples=12, fisher_batch_size=4))
    targets = set(model.peft_config["default"].target_modules)
    assert {"conv", "group_norm", "act", "norm", "head"} <= targets
    assert "scale" not in targets
    assert "Scale (1 modules)" in caplog.text and "Conv1d" not in caplog.text


@pytest.mark.parametrize("names", [["conv", "norm"], ["group_norm", "act"]])
def test_trained_generic_entries_merge_into_the_same_model(names):
    model = get_peft_model(
        Net(), FishIRDConfig(target_modules=names, keep_ratio=0.05, num_samples=12, fisher_batch_size=4)
    )
    model.prepare(
        [dict(x=b["x"][i], labels=b["labels"][i]) for b in batches() for i in range(len(b["labels"]))],
        data_collator=lambda rows: {
            "x": torch.stack([r["x"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
        },
        progress=False,
    )
    trainable = [p for p in model.parameters() if p.requires_grad and p.numel()]
    assert trainable
    optimizer = torch.optim.AdamW(trainable, lr=0.05)
    for batch in batches(seed=1):
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    x = batches(seed=2)[0]["x"]
    with torch.no_grad():
        adapter = model(x=x)["logits"]
        merged = model.merge_and_unload()(x=x)["logits"]
    torch.testing.assert_close(merged, adapter, atol=1e-6, rtol=0)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))

    def forward(self, x, y):
        return x * self.weight + y


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.head(self.gate(x, x))
        return SequenceClassifierOutput(loss=nn.functional.cross_entropy(logits, labels), logits=logits)


def test_a_target_called_with_extra_arguments_is_refused_in_the_fisher_pass():
    net = GatedNet()
    data = [{"x": torch.randn(4, 4), "labels": torch.tensor([0, 1, 0, 1])}]
    with pytest.raises(TypeError, match="must take one tensor argument"):
        compute_fisher(net, data, {"gate": net.gate}, progress=False)
