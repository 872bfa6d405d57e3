"""Weights shared by two modules (a causal LM's tied input embedding and output head), exactly:
the per-sample gradient sums both uses before squaring, one mask and one delta serve both uses,
a merge writes the shared tensor once and it stays tied. A use left untargeted is refused."""

import logging
import warnings

import pytest
import torch
from conftest import adamw_steps, adapter_masks, lm_collate, lm_examples, randomize_values, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from peft_fish_ird import FishIRDConfig, fisher_scores
from peft_fish_ird.fisher import compute_fisher
from peft_fish_ird.layer import FishIRDLayer
from peft_fish_ird.reference import fisher_loop, select_global_concat

TIED = "model.embed_tokens.weight"


class Scale(nn.Module):
    """A parametrised module type FishIRD has no rule for."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gain


def _config(**overrides):
    kwargs = dict(task_type="CAUSAL_LM", keep_ratio=0.05, num_samples=16, fisher_batch_size=4)
    kwargs.update(overrides)
    return FishIRDConfig(**kwargs)


def _prepared(seed=0, **overrides):
    model = get_peft_model(tiny_llama(seed, tied=True), _config(**overrides))
    model.prepare(lm_examples(24), data_collator=lm_collate, progress=False)
    return model


def _all_modules_with_params(model):
    return {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class TiedClassifier(nn.Module):
    """Token embedding -> mean -> tanh -> a head whose weight IS the embedding: one logit per token id."""

    def __init__(self, vocab: int = 7, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.norm(self.embed(input_ids).mean(1))))


def test_tied_fisher_sums_both_uses_before_squaring_like_the_batch_size_one_loop():
    model = tiny_llama(tied=True)
    targets = _all_modules_with_params(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batches = [lm_collate(lm_examples(12, seed=3)[i : i + 4]) for i in range(0, 12, 4)]
    mask = {TIED: torch.rand(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.3}
    fast = compute_fisher(model, batches, targets, sample_score_masks=mask, progress=False)
    slow_batches = [lm_collate([e]) for e in lm_examples(12, seed=3)]
    slow = fisher_loop(model, slow_batches, targets, sample_score_masks=mask)
    assert "lm_head.weight" not in fast.scores and TIED in fast.scores  # one score for the shared tensor
    assert fast.scores.keys() == slow.scores.keys()
    for key in slow.scores:
        torch.testing.assert_close(fast.scores[key].float(), slow.scores[key], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fast.sample_scores, slow.sample_scores, rtol=1e-4, atol=1e-9)
    # the cross term matters: the per-use sums alone would be a different score
    untied = tiny_llama(tied=True)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())  # same values, two tensors
    per_use = fisher_loop(untied, slow_batches, _all_modules_with_params(untied)).scores
    assert not torch.allclose(per_use[TIED] + per_use["lm_head.weight"], slow.scores[TIED], rtol=1e-2)


@pytest.mark.parametrize("fisher", ["empirical", "expected"])
def test_tied_classifier_fisher_squares_each_class_gradient_summed_over_uses(fisher):
    model = TiedClassifier()
    targets = _all_modules_with_params(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (12, 5), generator=g)  # some padding (id 0): its row is scored through the head only
    labels = torch.randint(0, 7, (12,), generator=g)
    batches = [{"input_ids": ids[i : i + 4], "labels": labels[i : i + 4]} for i in range(0, 12, 4)]
    fast = compute_fisher(model, batches, targets, fisher, progress=False)
    slow = fisher_loop(
        model, [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(12)], targets, fisher
    )
    assert fast.scores.keys() == slow.scores.keys() == {"embed.weight", "norm.weight", "norm.bias"}
    for key in slow.scores:
        torch.testing.assert_close(fast.scores[key].float(), slow.scores[key], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(fast.sample_scores, slow.sample_scores, rtol=1e-4, atol=1e-9)


def test_default_targets_of_a_tied_llama_give_the_global_top_k_over_every_parameter():
    examples = lm_examples(24)
    model = get_peft_model(tiny_llama(tied=True), _config())
    layers = {n for n, m in model.base_model.model.named_modules() if isinstance(m, FishIRDLayer)}
    assert {"lm_head", "model.embed_tokens", "model.norm"} <= layers
    record = model.prepare(examples, data_collator=lm_collate, progress=False)
    reference = tiny_llama(tied=True)
    assert set(record.shapes) == {n for n, _ in reference.named_parameters()}  # every parameter, tied one once
    assert record.total_params == sum(p.numel() for p in reference.parameters())
    drawn = [examples[i] for i in record.sample_indices]
    slow = fisher_loop(reference, [lm_collate([e]) for e in drawn], _all_modules_with_params(reference))
    expected, got = select_global_concat(slow.scores, record.k), adapter_masks(model)
    assert got.keys() == expected.keys() and record.entries_per_param[TIED] > 0
    overlap = sum(len(set(got[k].tolist()) & set(expected[k].tolist())) for k in expected)
    assert overlap >= record.k - 2  # float ties at the threshold are the only allowed difference


def test_both_uses_share_one_values_parameter_and_training_moves_only_its_entries():
    model = _prepared()
    embed, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    assert isinstance(embed, FishIRDLayer) and isinstance(head, FishIRDLayer)
    assert head.values("weight")["default"] is embed.values("weight")["default"]
    assert head.tied_owner("weight") is embed and head.base_param_names() == ()
    values = embed.values("weight")["default"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p is values for p in trainable) == 1
    before = {n: p.detach().clone() for n, p in tiny_llama(tied=True).named_parameters()}
    adamw_steps(model, trainable, lm_collate(lm_examples(8, seed=5)))
    masks = {k: set(v.tolist()) for k, v in adapter_masks(model).items()}
    merged = model.merge_and_unload()
    after = dict(merged.named_parameters())
    for name, old in before.items():
        changed = set((after[name].detach().reshape(-1) != old.reshape(-1)).nonzero().squeeze(1).tolist())
        assert changed <= masks.get(name, set()), name
    assert after[TIED].data_ptr() == merged.lm_head.weight.data_ptr()


@pytest.mark.parametrize("use_fast_path", [True, False])
def test_the_tied_values_gradient_sums_both_uses_like_a_dense_tied_delta(use_fast_path):
    model = _prepared()
    randomize_values(model, scale=0.05)
    for m in model.modules():
        if isinstance(m, FishIRDLayer):
            m.use_fast_path = use_fast_path
    embed = model.base_model.model.model.embed_tokens
    values, idx = embed.values("weight")["default"], embed.indices("weight")["default"]
    batch = lm_collate(lm_examples(6, seed=7))
    loss = model(**batch).loss
    loss.backward()
    # the plain model: every other delta written in, the tied one as a dense delta on the shared
    # tensor (functional_call ties lm_head and embed_tokens), its gradient by autograd
    reference = tiny_llama(tied=True)
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if isinstance(layer, FishIRDLayer):
                for p in layer.base_param_names():
                    if f"{name}.{p}" != TIED:
                        flat = reference.get_submodule(name).get_parameter(p).view(-1)
                        flat.index_add_(0, layer.indices(p)["default"], layer.values(p)["default"].detach())
    shared = reference.lm_head.weight.detach()
    delta = torch.zeros(shared.numel(), requires_grad=True)
    weight = (shared.reshape(-1).index_add(0, idx, values.detach()) + delta).view_as(shared)
    expected = functional_call(reference, {"lm_head.weight": weight}, args=(), kwargs=batch).loss
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values.grad, delta.grad[idx], rtol=1e-4, atol=1e-7)


def test_merged_tied_model_equals_the_adapter_and_stays_tied():
    model = _prepared()
    randomize_values(model, scale=0.2)
    batch = lm_collate(lm_examples(4, seed=9))
    adapter = _logits(model, batch)
    assert not torch.allclose(adapter, _logits(tiny_llama(tied=True), batch), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PEFT "tied modules ... complications" warning: the merge is exact
        merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits(merged, batch), adapter, rtol=0, atol=1e-4)


def test_unmerge_restores_the_shared_tensor_bit_for_bit():
    model = _prepared()
    randomize_values(model, scale=0.2)
    original = tiny_llama(tied=True).lm_head.weight.detach()
    model.merge_adapter()
    shared = model.base_model.model.lm_head.base_layer.weight
    assert not torch.equal(shared, original)
    model.unmerge_adapter()
    assert torch.equal(shared, original)


def test_saved_tied_adapter_holds_one_values_tensor_and_reloads_exactly(tmp_path):
    model = _prepared()
    randomize_values(model, scale=0.2)
    batch = lm_collate(lm_examples(4, seed=9))
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path, save_embedding_layers=False)  # see the README: PEFT's "auto" adds the base
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any("embed_tokens.fishird_weight_values" in k for k in saved)
    assert not any("lm_head.fishird_weight" in k for k in saved)
    assert all("fishird_" in k for k in saved), [k for k in saved if "fishird_" not in k]  # no base embedding
    loaded = PeftModel.from_pretrained(tiny_llama(tied=True), tmp_path)
    head = loaded.base_model.model.lm_head
    assert head.values("weight")["default"] is loaded.base_model.model.model.embed_tokens.values("weight")["default"]
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # a loaded tied adapter counts as prepared
    with_base = load_file(tmp_path / "again" / "adapter_model.safetensors")  # PEFT's default "auto": the base too
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in with_base)


@pytest.mark.parametrize(("target", "other"), [("lm_head", "model.embed_tokens"), ("embed_tokens", "lm_head")])
def test_targeting_one_use_of_a_tied_weight_is_refused_naming_both_uses(target, other):
    with pytest.raises(ValueError, match=rf"cannot target .*{target}.* alone: its weight is shared with '{other}'"):
        get_peft_model(tiny_llama(tied=True), FishIRDConfig(target_modules=[target]))


def test_fisher_scores_of_one_use_of_a_tied_weight_are_refused():
    with pytest.raises(ValueError, match="shared with 'model.embed_tokens'.*not a target"):
        fisher_scores(tiny_llama(tied=True), lm_examples(8), data_collator=lm_collate, target_modules=["lm_head"])


def test_fisher_scores_key_a_tied_tensor_once_by_its_first_name():
    scores = fisher_scores(tiny_llama(tied=True), lm_examples(8), data_collator=lm_collate, num_samples=8)
    assert TIED in scores and "lm_head.weight" not in scores


def test_untied_embeddings_are_separate_targets():
    model = _prepared(0)
    untied = get_peft_model(tiny_llama(tied=False), _config())
    untied.prepare(lm_examples(24), data_collator=lm_collate, progress=False)
    assert "lm_head.weight" in adapter_masks(untied) and "lm_head.weight" not in adapter_masks(model)


def test_default_targets_leave_out_a_tied_pair_whose_other_use_cannot_be_adapted(caplog):
    class TiedToScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.scale = Scale(4)
            self.scale.gain = self.proj.bias  # one tensor: a Linear's bias and an unsupported module's gain
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.scale(self.proj(x)))

    with caplog.at_level(logging.WARNING, logger="peft_fish_ird"):
        peft_model = get_peft_model(TiedToScale(), FishIRDConfig())
    assert sorted(peft_model.peft_config["default"].target_modules) == ["out"]
    assert "leaves out ['proj']" in caplog.text


def test_default_targets_name_parametrised_types_without_a_rule(caplog):
    model = nn.Sequential(nn.Linear(4, 4), Scale(4), Scale(4), nn.Linear(4, 2))
    with caplog.at_level(logging.WARNING, logger="peft_fish_ird"):
        peft_model = get_peft_model(model, FishIRDConfig())
    assert sorted(peft_model.peft_config["default"].target_modules) == ["0", "3"]
    assert "Scale (2 modules)" in caplog.text
