"""The batched Fisher engine equals the batch-size-1 loop (reference.fisher_loop)."""

import pytest
import torch
from conftest import batches_of, make_examples, tiny_bert, tiny_gpt2
from torch import nn

from peft_fish_ird.fisher import NonFiniteFisherError, compute_fisher
from peft_fish_ird.layer import is_supported_layer
from peft_fish_ird.reference import fisher_loop, unpad_sample

HEADS = ("classifier", "score")


def _targets(model):
    return {n: m for n, m in model.named_modules() if is_supported_layer(m) and not n.startswith(HEADS)}


def _max_relative_error(fast, slow):
    """Per tensor max |fast - slow| / max |slow|; structurally-zero tensors are compared to the global scale."""
    scale = max(float(v.abs().max()) for v in slow.values())
    worst = 0.0
    for key, ref in slow.items():
        denom = max(float(ref.abs().max()), 1e-9 * scale)
        worst = max(worst, float((fast[key] - ref).abs().max()) / denom)
    return worst


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("fisher", ["empirical", "expected"])
def test_batched_fisher_equals_batch_size_one_loop_with_padding(make_model, fisher):
    model = make_model(num_labels=3)
    batches = batches_of(make_examples(12, num_labels=3, min_len=2, max_len=14), 6)
    assert (batches[0]["attention_mask"] == 0).any(), "the case must contain padding"
    targets = _targets(model)
    fast = compute_fisher(model, batches, targets, fisher, progress=False)
    slow = fisher_loop(model, batches, targets, fisher)
    assert set(fast.scores) == set(slow.scores)
    assert _max_relative_error(fast.scores, slow.scores) < 1e-5
    assert torch.allclose(fast.sample_scores, slow.sample_scores, rtol=1e-5, atol=0)
    assert all(v.dtype == torch.float64 for v in fast.scores.values())


def test_padding_contributes_nothing():
    model = tiny_bert()
    examples = make_examples(4, min_len=3, max_len=5)
    tight = batches_of(examples, 4)
    wide = dict(tight[0])
    extra = 6
    wide["input_ids"] = torch.cat([wide["input_ids"], torch.zeros(4, extra, dtype=torch.long)], 1)
    wide["attention_mask"] = torch.cat([wide["attention_mask"], torch.zeros(4, extra, dtype=torch.long)], 1)
    targets = _targets(model)
    a = compute_fisher(model, tight, targets, progress=False)
    b = compute_fisher(model, [wide], targets, progress=False)
    assert _max_relative_error(b.scores, a.scores) < 1e-5


def test_fisher_does_not_depend_on_batch_size():
    model = tiny_gpt2()
    examples = make_examples(12)
    targets = _targets(model)
    a = compute_fisher(model, batches_of(examples, 12), targets, progress=False)
    b = compute_fisher(model, batches_of(examples, 5), targets, progress=False)
    assert _max_relative_error(a.scores, b.scores) < 1e-5
    assert torch.allclose(a.sample_scores, b.sample_scores, rtol=1e-5)


def test_sample_scores_restricted_to_a_parameter_range_match_the_loop():
    model = tiny_bert()
    batches = batches_of(make_examples(8), 4)
    targets = _targets(model)
    g = torch.Generator().manual_seed(0)
    masks = {
        "bert.embeddings.word_embeddings.weight": torch.rand(
            model.bert.embeddings.word_embeddings.weight.shape, generator=g
        )
        < 0.3,
        "bert.pooler.dense.weight": torch.rand(model.bert.pooler.dense.weight.shape, generator=g) < 0.5,
    }
    fast = compute_fisher(model, batches, targets, sample_score_masks=masks, progress=False)
    slow = fisher_loop(model, batches, targets, sample_score_masks=masks)
    full = compute_fisher(model, batches, targets, progress=False)
    assert torch.allclose(fast.sample_scores, slow.sample_scores, rtol=1e-5)
    assert (fast.sample_scores < full.sample_scores).all()


def test_bf16_model_accumulates_in_float32_or_wider():
    model = tiny_bert().to(torch.bfloat16)
    batches = batches_of(make_examples(8), 4)
    result = compute_fisher(model, batches, _targets(model), progress=False)
    assert all(v.dtype == torch.float64 for v in result.scores.values())
    assert result.sample_scores.dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in result.scores.values())
    assert float(result.scores["bert.pooler.dense.weight"].sum()) > 0


def test_fisher_pass_restores_training_mode_and_requires_grad():
    model = tiny_bert().train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    compute_fisher(model, batches_of(make_examples(4), 4), _targets(model), progress=False)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_loss_names_the_sample():
    model = tiny_bert()
    batches = batches_of(make_examples(8), 4)

    def loss_fn(logits, labels):
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        return losses * torch.tensor([1.0, 1.0, float("nan"), 1.0]) if losses.shape[0] == 4 else losses

    with pytest.raises(NonFiniteFisherError, match="sample 2"):
        compute_fisher(model, batches, _targets(model), loss_fn=loss_fn, progress=False)


@pytest.mark.parametrize("make_model", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("fisher", ["empirical", "expected"])
def test_fisher_without_per_sample_scores_gives_the_same_scores_bit_for_bit(make_model, fisher):
    model = make_model(num_labels=3)
    batches = batches_of(make_examples(12, num_labels=3, min_len=2, max_len=14), 6)
    targets = _targets(model)
    full = compute_fisher(model, batches, targets, fisher, progress=False)
    only = compute_fisher(model, batches, targets, fisher, progress=False, sample_scores=False)
    assert set(full.scores) == set(only.scores)
    assert all(torch.equal(full.scores[k], only.scores[k]) for k in full.scores)
    assert only.sample_scores.numel() == 0 and full.sample_scores.numel() == 12
    assert only.num_samples == 12


def test_fisher_without_per_sample_scores_on_tied_embeddings_matches():
    from conftest import lm_batches, tiny_llama

    model = tiny_llama(tied=True)
    targets = {n: m for n, m in model.named_modules() if is_supported_layer(m)}
    batches = lm_batches(8, 4)
    full = compute_fisher(model, batches, targets, progress=False)
    only = compute_fisher(model, batches, targets, progress=False, sample_scores=False)
    assert all(torch.equal(full.scores[k], only.scores[k]) for k in full.scores)


def test_non_finite_gradient_with_a_finite_loss_names_the_sample_without_per_sample_scores():
    model = tiny_bert()
    batches = batches_of(make_examples(8), 4)

    def loss_fn(logits, labels):
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        # sqrt at 0: the value is 0 (the loss stays finite), the gradient is inf, for sample 2 alone
        kink = torch.sqrt(logits[2:3, 0] - logits[2:3, 0].detach())
        return losses + torch.cat([torch.zeros(2), kink, torch.zeros(1)])

    for sample_scores in (True, False):  # without per-sample scores the pass reruns with them to name it
        with pytest.raises(NonFiniteFisherError, match="sample 2 "):
            compute_fisher(
                model, batches, _targets(model), loss_fn=loss_fn, progress=False, sample_scores=sample_scores
            )


def test_sample_score_masks_need_per_sample_scores():
    model = tiny_bert()
    targets = _targets(model)
    key = next(f"{n}.weight" for n in targets)
    mask = {key: torch.ones_like(dict(model.named_parameters())[key], dtype=torch.bool)}
    with pytest.raises(ValueError, match="pass sample_scores=True"):
        compute_fisher(model, batches_of(make_examples(4), 4), targets, sample_score_masks=mask, sample_scores=False)


def test_shared_module_is_refused_loudly():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x)).sum(-1, keepdim=True).repeat(1, 2)

    model = Twice()
    batch = {"x": torch.randn(3, 4), "labels": torch.tensor([0, 1, 0])}
    with pytest.raises(NotImplementedError, match="more than once"):
        compute_fisher(model, [batch], {"lin": model.lin}, progress=False)


class _Gain(nn.Module):
    """A parameter named neither weight nor bias: no layer type, not even the generic one, covers it."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.gain


def test_unknown_layer_type_is_refused_loudly():
    with pytest.raises(TypeError, match="No per-sample Fisher rule"):
        compute_fisher(_Gain(), [], {"gain": _Gain()}, progress=False)


def test_unpad_sample_strips_padded_positions():
    batch = batches_of(make_examples(3, min_len=2, max_len=9), 3)[0]
    for i in range(3):
        s = unpad_sample(batch, i)
        assert s["attention_mask"].all() and s["input_ids"].shape[1] == int(batch["attention_mask"][i].sum())


class _SeqMLP(nn.Module):
    """Token MLP with a weight large enough for the per-sample-GEMM path, mean-pooled to 3 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(24, 12_000)
        self.down = nn.Linear(12_000, 3)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x))).mean(1)


class _SeqMLPWide(nn.Module):
    """A large weight with few rows and many columns (24 x 12,000), beside a tall one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(24, 12_000)
        self.down = nn.Linear(12_000, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.down(torch.tanh(self.up(x)))).mean(1)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "range"])
@pytest.mark.parametrize("make_model", [_SeqMLP, _SeqMLPWide], ids=["tall", "wide"])
def test_large_weight_path_equals_the_loop(masked, make_model):
    from peft_fish_ird import fisher as fisher_module

    model = make_model()
    assert model.up.weight.numel() >= fisher_module.PER_SAMPLE_GEMM_MIN_ELEMENTS
    assert model.down.weight.numel() >= fisher_module.PER_SAMPLE_GEMM_MIN_ELEMENTS or make_model is _SeqMLP
    g = torch.Generator().manual_seed(3)
    batches = [
        {"x": torch.randn(5, 4, 24, generator=g), "labels": torch.randint(0, 3, (5,), generator=g)} for _ in range(2)
    ]
    targets = {n: m for n, m in model.named_children()}
    masks = {"up.weight": torch.rand(model.up.weight.shape, generator=g) < 0.4} if masked else None
    if masked and make_model is _SeqMLPWide:
        masks["down.weight"] = torch.rand(model.down.weight.shape, generator=g) < 0.4
    fast = compute_fisher(model, batches, targets, sample_score_masks=masks, progress=False)
    slow = fisher_loop(model, batches, targets, sample_score_masks=masks)
    assert _max_relative_error(fast.scores, slow.scores) < 1e-5
    assert torch.allclose(fast.sample_scores, slow.sample_scores, rtol=1e-5)
