"""The one place that tells PEFT about the FishIRD method type.

PEFT 0.21's ``peft.utils.register_peft_method`` only accepts names that are members of PEFT's
closed ``PeftType`` enum, so an out-of-tree method cannot use it. Nothing else in PEFT needs
``PeftType`` membership: a ``peft_type`` is looked up in three plain dicts of ``peft.mapping``
(config class, tuner class, parameter prefix). This module writes those dicts itself, with our
own one-member ``str`` enum (``config.FishIRDPeftType``), repeating the checks
``register_peft_method`` meant to make. It is idempotent, so re-imports (pytest, notebooks) are
harmless.

PEFT has no plugin discovery: ``import peft_fish_ird`` must run before
``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained`` meets a saved FishIRD adapter.
"""

from __future__ import annotations

from peft import mapping

from .config import PREFIX, FishIRDConfig, FishIRDPeftType
from .model import FishIRDModel


def register() -> None:
    """Register ``FishIRDConfig`` / ``FishIRDModel`` with PEFT's mappings (idempotent).

    Raises:
        KeyError: another package registered a different class under ``FISH_IRD`` or took
            the ``fishird_`` prefix.
    """
    peft_type = FishIRDPeftType.FISH_IRD
    wanted = {
        "PEFT_TYPE_TO_CONFIG_MAPPING": FishIRDConfig,
        "PEFT_TYPE_TO_TUNER_MAPPING": FishIRDModel,
        "PEFT_TYPE_TO_PREFIX_MAPPING": PREFIX,
    }
    for table_name, value in wanted.items():
        existing = getattr(mapping, table_name).get(peft_type)
        if existing is not None and _qualname(existing) != _qualname(value):
            raise KeyError(
                f"PEFT method type {peft_type.value!r} is already registered in peft.mapping.{table_name} "
                f"as {existing!r}; two packages claim the same name. Uninstall one of them."
            )
    for other_type, prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == PREFIX and other_type != peft_type:
            raise KeyError(
                f"The parameter prefix {PREFIX!r} is already used by PEFT method {other_type!r}; "
                "FishIRD cannot share it."
            )
    if FishIRDModel.prefix != PREFIX:
        raise ValueError(f"FishIRDModel.prefix is {FishIRDModel.prefix!r}, expected {PREFIX!r}.")
    for table_name, value in wanted.items():
        getattr(mapping, table_name)[peft_type] = value


def _qualname(obj: object) -> str:
    """Name that survives module reloads (classes compare by module + qualname)."""
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"
