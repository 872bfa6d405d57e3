"""peft_fish_ird: FISH-mask sparse fine-tuning with IRD selection, as a HuggingFace PEFT method.

Importing the package registers the ``FISH_IRD`` method type with PEFT, so ``get_peft_model``,
``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` handle FishIRD adapters.
"""

from ._registration import register
from ._version import __version__
from .config import FishIRDConfig, FishIRDPeftType
from .fisher import FisherResult, NonFiniteFisherError, compute_fisher
from .functional import prepare_model
from .integration import FishIRDCallback, get_peft_model, prepare_from_trainer
from .layer import FishIRDLayer, FishIRDModule, UnpreparedAdapterError
from .layer_types import register_layer_type
from .masks import fish_mask, fisher_scores, shira_budget, shira_mask_fn
from .model import FishIRDModel
from .quantization import dequantize_bnb
from .record import SelectionRecord

register()

__all__ = [
    "FishIRDCallback",
    "FishIRDConfig",
    "FishIRDLayer",
    "FishIRDModel",
    "FishIRDModule",
    "FishIRDPeftType",
    "FisherResult",
    "NonFiniteFisherError",
    "SelectionRecord",
    "UnpreparedAdapterError",
    "compute_fisher",
    "dequantize_bnb",
    "fish_mask",
    "fisher_scores",
    "get_peft_model",
    "prepare_from_trainer",
    "prepare_model",
    "register",
    "register_layer_type",
    "shira_budget",
    "shira_mask_fn",
    "__version__",
]
