"""peft_fish_ird: FISH-mask sparse fine-tuning with IRD selection, as a HuggingFace PEFT method.

Importing the package registers the ``FISH_IRD`` method type with PEFT, so ``get_peft_model``,
``PeftConfig.from_pretrained`` and ``PeftModel.from_pretrained`` handle FishIRD adapters.
"""

__version__ = "0.1.0"

from ._registration import FishIRDPeftType, register  # noqa: E402
from .config import FishIRDConfig  # noqa: E402
from .fisher import FisherResult, NonFiniteFisherError, compute_fisher  # noqa: E402
from .integration import FishIRDCallback, get_peft_model  # noqa: E402
from .layer import FishIRDLayer, FishIRDModule, UnpreparedAdapterError  # noqa: E402
from .masks import fish_mask, fisher_scores, shira_budget, shira_mask_fn  # noqa: E402
from .model import FishIRDModel  # noqa: E402
from .record import SelectionRecord  # noqa: E402

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
    "fish_mask",
    "fisher_scores",
    "get_peft_model",
    "register",
    "shira_budget",
    "shira_mask_fn",
    "__version__",
]
