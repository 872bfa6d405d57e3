"""FishIRDConfig validates at the boundary with errors naming field, value and fix."""

import pytest
from conftest import tiny_bert

from peft_fish_ird import FishIRDConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"keep_ratio": 0.0}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": "0.005"}, "keep_ratio"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 10.5}, "num_samples"),
        ({"fisher": "diag"}, "fisher"),
        ({"budget": "layerwise"}, "budget"),
        ({"fisher_batch_size": 0}, "fisher_batch_size"),
        ({"head_in_budget": "yes"}, "head_in_budget"),
        ({"keep_effective_weight": 1}, "keep_effective_weight"),
        ({"seed": 1.0}, "seed"),
        ({"target_parameters": ["weight"]}, "target_parameters"),
    ],
)
def test_invalid_values_raise_errors_naming_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError)) as err:
        FishIRDConfig(**kwargs)
    assert field in str(err.value)


def test_defaults_match_the_fish_reference():
    cfg = FishIRDConfig()
    assert (cfg.keep_ratio, cfg.num_samples, cfg.fisher, cfg.budget, cfg.head_in_budget) == (
        0.005,
        1024,
        "empirical",
        "global",
        True,
    )
    assert cfg.target_modules is None


def test_every_field_has_help_text():
    from dataclasses import fields

    own = {f.name for f in fields(FishIRDConfig)} - {f.name for f in fields(FishIRDConfig.__mro__[1])}
    for f in fields(FishIRDConfig):
        if f.name in own:
            assert f.metadata.get("help"), f.name


def test_keep_effective_weight_reaches_every_adapted_layer():
    from peft import get_peft_model

    from peft_fish_ird.layer import FishIRDLayer

    for keep in (False, True):
        model = get_peft_model(tiny_bert(), FishIRDConfig(task_type="SEQ_CLS", keep_effective_weight=keep))
        layers = [m for m in model.modules() if isinstance(m, FishIRDLayer)]
        assert layers and all(m.keep_effective_weight == {"default": keep} for m in layers)
