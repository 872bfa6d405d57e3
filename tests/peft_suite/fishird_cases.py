"""FishIRDConfig with a data-free initial mask by default, for PEFT's tests that use class defaults.

Copied into the patched PEFT suite by ``run_peft_suite.py``. Tests parametrised by the config
class alone build it from its defaults; FishIRD's default mask ("fisher") needs data, so they get
a random mask instead, and the head outside the budget (their DeepMLP head is larger than 0.5% of
the model, so it would leave no sparse entries).
"""

from dataclasses import dataclass

from peft_fish_ird import FishIRDConfig


@dataclass
class FishIRDDataFreeConfig(FishIRDConfig):
    mask_init: str = "random"
    head_in_budget: bool = False
