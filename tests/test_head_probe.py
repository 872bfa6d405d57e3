"""Head probing in ``prepare`` (``FishIRDConfig.head_probe_steps``): the head alone is trained first,
and the Fisher pass then scores entries through that trained head."""

import copy

import pytest
import torch
from conftest import adapter_masks, fish_config, make_examples, pad_collate, tiny_bert
from peft import get_peft_model
from torch.utils.data import DataLoader

from peft_fish_ird import FishIRDConfig
from peft_fish_ird.head_probe import HeadProbeSettings, probe_order

STEPS, LR, BATCH = 6, 0.05, 4


def probed_by_hand(base, examples, seed=0):
    """The slow obvious version: AdamW on the classifier alone, the body frozen, the same batches."""
    model = copy.deepcopy(base)
    head = list(model.classifier.parameters())
    for p in model.parameters():
        p.requires_grad_(p in set(head))
    optimizer = torch.optim.AdamW(head, lr=LR, weight_decay=0.0)
    model.train()
    torch.manual_seed(seed)  # prepare draws the probe's dropout from config.seed
    losses = []
    for idx in probe_order(len(examples), HeadProbeSettings(STEPS, LR, BATCH, seed)):
        loss = model(**pad_collate([examples[i] for i in idx])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), losses


def probe_config(**kw):
    return fish_config(**{"head_probe_steps": STEPS, "head_probe_lr": LR, "head_probe_batch_size": BATCH, **kw})


def test_prepare_with_head_probe_equals_probing_the_head_by_hand_then_plain_fish():
    examples = make_examples(24)
    base = tiny_bert(0)
    probed_model = get_peft_model(copy.deepcopy(base), probe_config())
    record = probed_model.prepare(examples, data_collator=pad_collate, progress=False)

    by_hand, losses = probed_by_hand(base, examples)
    reference = get_peft_model(by_hand, fish_config())
    reference.prepare(examples, data_collator=pad_collate, progress=False)

    masks, expected = adapter_masks(probed_model), adapter_masks(reference)
    assert masks.keys() == expected.keys()
    assert all(torch.equal(masks[k], expected[k]) for k in masks)
    trained = probed_model.base_model.model.classifier.modules_to_save["default"]
    for got, want in zip(trained.parameters(), by_hand.classifier.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    info = record.settings["head_probe"]
    assert (info["steps"], info["lr"], info["batch_size"]) == (STEPS, LR, BATCH)
    assert info["first_loss"] == pytest.approx(losses[0], abs=1e-6)
    assert info["last_loss"] == pytest.approx(losses[-1], abs=1e-6)


def test_head_probe_changes_the_mask_and_leaves_body_original_head_and_trainable_flags_alone():
    examples = make_examples(24)
    base = tiny_bert(0)
    plain = get_peft_model(copy.deepcopy(base), fish_config())
    plain.prepare(examples, data_collator=pad_collate, progress=False)
    probed = get_peft_model(copy.deepcopy(base), probe_config())
    probed.prepare(examples, data_collator=pad_collate, progress=False)

    a, b = adapter_masks(plain), adapter_masks(probed)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # a trained head scores the body differently
    assert [n for n, p in plain.named_parameters() if p.requires_grad] == [
        n for n, p in probed.named_parameters() if p.requires_grad
    ]
    wrapper = probed.base_model.model.classifier
    for original, pretrained in zip(wrapper.original_module.parameters(), base.classifier.parameters()):
        assert torch.equal(original, pretrained)
    assert any(
        not torch.equal(c, o)
        for c, o in zip(wrapper.modules_to_save["default"].parameters(), wrapper.original_module.parameters())
    )
    body = {n: p for n, p in base.named_parameters() if not n.startswith("classifier")}
    for name, p in probed.get_base_model().named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in body:
            assert torch.equal(p, body[clean]), name


def test_head_probe_runs_from_a_dataloader():
    examples = make_examples(24)
    loader = DataLoader(examples, batch_size=BATCH, collate_fn=pad_collate)
    model = get_peft_model(tiny_bert(0), probe_config(head_probe_steps=8))  # 8 steps: the loader starts again
    record = model.prepare(loader, progress=False)
    assert record.settings["head_probe"]["steps"] == 8


def test_head_probe_without_a_head_is_refused_with_the_fix():
    model = get_peft_model(tiny_bert(0), probe_config(task_type=None))
    with pytest.raises(ValueError, match="modules_to_save"):
        model.prepare(make_examples(24), data_collator=pad_collate, progress=False)


def test_head_probe_needs_one_full_batch():
    model = get_peft_model(tiny_bert(0), probe_config(head_probe_batch_size=32))
    with pytest.raises(ValueError, match="at least head_probe_batch_size=32"):
        model.prepare(make_examples(24), data_collator=pad_collate, progress=False)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("head_probe_steps", -1, "head_probe_steps=-1 is invalid"),
        ("head_probe_steps", True, "head_probe_steps=True is invalid"),
        ("head_probe_batch_size", 0, "head_probe_batch_size=0 is invalid"),
        ("head_probe_lr", 0.0, "head_probe_lr=0.0 is invalid"),
        ("head_probe_lr", float("nan"), "head_probe_lr=nan is invalid"),
    ],
)
def test_bad_head_probe_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        FishIRDConfig(**{field: value})


def test_probe_order_reshuffles_each_pass_and_skips_the_partial_batch():
    steps = probe_order(10, HeadProbeSettings(steps=5, batch_size=4, seed=3))
    assert [len(s) for s in steps] == [4] * 5
    first_pass, second_pass = steps[0] + steps[1], steps[2] + steps[3]
    assert len(set(first_pass)) == 8 and len(set(second_pass)) == 8 and first_pass != second_pass
    assert steps == probe_order(10, HeadProbeSettings(steps=5, batch_size=4, seed=3))


def test_ird_scores_candidates_from_the_probed_head_and_keeps_it():
    examples = make_examples(40)
    base = tiny_bert(0)
    fish = get_peft_model(copy.deepcopy(base), probe_config())
    fish.prepare(examples, data_collator=pad_collate, progress=False)
    ird = get_peft_model(
        copy.deepcopy(base), probe_config(selection="ird", ird_rounds=2, ird_min_samples=4, ird_eval_steps=2)
    )
    record = ird.prepare(examples, data_collator=pad_collate, progress=False)
    assert len(record.trace) == 2 and record.settings["head_probe"]["steps"] == STEPS
    heads = [m.base_model.model.classifier.modules_to_save["default"] for m in (fish, ird)]
    for a, b in zip(*(h.parameters() for h in heads)):
        assert torch.equal(a, b)  # the scorer's fine-tunes were undone: the head is the probed one


# ------------------------------------------------------------------------------------- the "auto" default
def test_auto_is_the_default_and_probes_a_new_sequence_classification_head_for_48_steps():
    from peft_fish_ird.head_probe import AUTO_STEPS

    assert FishIRDConfig().head_probe_steps == "auto" and AUTO_STEPS == 48
    examples = make_examples(24)
    base = tiny_bert(0)
    auto = get_peft_model(copy.deepcopy(base), fish_config(head_probe_steps="auto", head_probe_batch_size=BATCH))
    record = auto.prepare(examples, data_collator=pad_collate, progress=False)
    explicit = get_peft_model(copy.deepcopy(base), fish_config(head_probe_steps=48, head_probe_batch_size=BATCH))
    explicit.prepare(examples, data_collator=pad_collate, progress=False)
    a, b = adapter_masks(auto), adapter_masks(explicit)
    assert all(torch.equal(a[k], b[k]) for k in a)  # "auto" here is exactly 48 steps
    info = record.settings["head_probe"]
    assert info["steps"] == 48 and info["chosen"].startswith("auto: 48 steps")
    from peft_fish_ird.functional import summary_line

    assert "; head probed first (48 steps, loss " in summary_line(record)
    assert explicit.peft_config["default"].head_probe_steps == 48


@pytest.mark.parametrize(
    "case, why",
    [
        ("no_task_type", "has no new head to probe"),
        ("few_examples", "training examples < head_probe_batch_size"),
    ],
)
def test_auto_does_not_probe_without_a_new_head_or_a_full_batch_and_records_why(case, why):
    examples = make_examples(24)
    base = tiny_bert(0)
    overrides = {"head_probe_steps": "auto"}
    if case == "no_task_type":
        overrides["task_type"] = None  # no task type: PEFT makes no head copy, so nothing to probe
        overrides["target_modules"] = ["query", "value"]
    else:
        overrides["head_probe_batch_size"] = 32  # more than the 24 examples
    model = get_peft_model(copy.deepcopy(base), fish_config(**overrides))
    record = model.prepare(examples, data_collator=pad_collate, progress=False)
    plain = get_peft_model(copy.deepcopy(base), fish_config(**{**overrides, "head_probe_steps": 0}))
    plain.prepare(examples, data_collator=pad_collate, progress=False)
    a, b = adapter_masks(model), adapter_masks(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)  # nothing probed: plain FISH's mask
    assert record.settings["head_probe"]["steps"] == 0 and why in record.settings["head_probe"]["chosen"]


def test_auto_resolves_by_task_type_head_and_data_size():
    from peft_fish_ird.head_probe import resolve_steps

    assert resolve_steps("auto", "SEQ_CLS", True, 24, 16)[0] == 48
    assert resolve_steps("auto", "SEQ_CLS", True, None, 16)[0] == 48  # a DataLoader: its own batches
    assert "modules_to_save is empty" in resolve_steps("auto", "SEQ_CLS", False, 24, 16)[1]
    steps, why = resolve_steps("auto", "CAUSAL_LM", True, 1000, 16)
    assert steps == 0 and "no new head" in why  # a causal LM's head is pretrained
    assert resolve_steps(12, "CAUSAL_LM", True, 1000, 16) == (12, "set")  # an int is taken as given
    assert resolve_steps(0, "SEQ_CLS", True, 1000, 16)[0] == 0


def test_head_probe_steps_refuses_other_strings():
    with pytest.raises(ValueError, match="'auto' \\(the default\\), a number of steps"):
        FishIRDConfig(head_probe_steps="yes")
