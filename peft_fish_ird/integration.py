"""HF Trainer glue: a callback that prepares the mask inside a Trainer pipeline and checks that the
optimizer trains it.

The mask must exist before the optimizer is built, because ``prepare`` creates the values
tensors. HF Trainer builds its optimizer inside ``train()`` (after loading a checkpoint when
resuming), so both of these work:

* ``model.prepare(train_dataset, data_collator=collator)`` any time before ``trainer.train()``
  (the recommended one-line change from a LoRA script);
* ``Trainer(..., callbacks=[FishIRDCallback(train_dataset, data_collator=collator)])``: prepares
  when the Trainer is constructed (``on_init_end``), for pipelines that build the Trainer for you;
* ``prepare_from_trainer(trainer)`` after constructing a trainer that tokenizes the data itself
  (TRL's ``SFTTrainer``): a callback cannot do this, since no callback event before the optimizer
  is built sees the trainer's dataset.

Either way the callback's ``on_train_begin`` check (also installed by passing the callback with no
dataset) fails loudly when an optimizer built before ``prepare`` would silently leave the mask
untrained (e.g. ``Trainer(optimizers=(opt, sched))`` with ``opt`` created too early).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn
from transformers import TrainerCallback


class FishIRDCallback(TrainerCallback):
    """Prepare a FishIRD adapter inside an HF Trainer pipeline and verify the optimizer covers it.

    Args:
        train_dataset: data for ``prepare`` (run when the adapter has no mask, or only its data-free initial
            one from ``mask_init``); None to only check (the model was prepared already).
        data_collator: collator for ``prepare``.
        **prepare_kwargs: passed to ``prepare`` (``selection_dataset``, ``evaluator``, ...).
    """

    def __init__(
        self,
        train_dataset: Any = None,
        data_collator: Optional[Callable] = None,
        **prepare_kwargs: Any,
    ) -> None:
        self.train_dataset = train_dataset
        self.data_collator = data_collator
        self.prepare_kwargs = prepare_kwargs

    def on_init_end(self, args, state, control, model: Optional[nn.Module] = None, **kwargs: Any):
        if self.train_dataset is None or model is None:
            return control
        tuner = _fishird_tuner(model)
        # no mask yet, or only the data-free initial one (``mask_init``): select from the data given
        if tuner.selection is None or tuner.selection.fisher == "none":
            tuner.prepare(self.train_dataset, data_collator=self.data_collator, **self.prepare_kwargs)
        return control

    def on_train_begin(
        self, args, state, control, model: Optional[nn.Module] = None, optimizer: Any = None, **kwargs: Any
    ):
        if model is None or optimizer is None:
            return control
        tuner = _fishird_tuner(model)
        if tuner.selection is None:
            from .layer import UnpreparedAdapterError, unprepared_message

            raise UnpreparedAdapterError(unprepared_message(tuner.active_adapters[0]))
        check_optimizer_covers(model, optimizer)
        return control


def prepare_from_trainer(trainer: Any, **prepare_kwargs: Any) -> Any:
    """Prepare the FishIRD adapter of ``trainer.model`` on the trainer's own ``train_dataset`` and ``data_collator``.

    For trainers that tokenize the data themselves, such as TRL's ``SFTTrainer`` (prompt/completion
    pairs become ``input_ids`` and ``labels`` with -100 on the prompt): call it after constructing the
    trainer and before ``train()``, so the Fisher pass sees the tokens and labels training sees.
    ``prepare_kwargs`` go to ``prepare``. Returns the ``SelectionRecord``.

    Packed or padding-free data is refused: a Fisher sample must be one example, and ``prepare`` keeps
    only the model's inputs, so the packed sequences' boundaries would be lost.
    """
    tuner = _fishird_tuner(trainer.model)
    args = trainer.args
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        raise ValueError(
            "prepare_from_trainer needs one example per sequence, but the trainer packs examples (packing / "
            "padding_free): prepare on the unpacked tokenized data first, `model.prepare(dataset, data_collator=...)`, "
            "then build the trainer."
        )
    if trainer.train_dataset is None:
        raise ValueError("The trainer has no train_dataset to prepare the FishIRD mask on; pass train_dataset=...")
    return tuner.prepare(trainer.train_dataset, data_collator=trainer.data_collator, **prepare_kwargs)


def _fishird_tuner(model: nn.Module) -> Any:
    from .model import FishIRDModel

    base = getattr(model, "base_model", None)
    if isinstance(base, FishIRDModel):
        return base
    if isinstance(model, FishIRDModel):
        return model
    raise TypeError(f"FishIRDCallback needs a PeftModel with a FishIRD adapter, got {type(model).__name__}.")


def check_optimizer_covers(model: nn.Module, optimizer: Any) -> None:
    """Raise if a trainable FishIRD values tensor is missing from the optimizer's parameter groups."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and "fishird_" in n and id(p) not in held]
    if missing:
        raise RuntimeError(
            f"The optimizer does not hold {len(missing)} FishIRD values tensors (e.g. {missing[0]}): it was built "
            "before `prepare`, which creates them, so they would never train. Build the optimizer (or pass "
            "`optimizers=`) after `model.prepare(...)`."
        )


def get_peft_model(
    model: nn.Module,
    peft_config: Any,
    adapter_name: str = "default",
    *,
    train_dataset: Any = None,
    data_collator: Optional[Callable] = None,
    prepare_kwargs: Optional[dict[str, Any]] = None,
    **kwargs: Any,
) -> nn.Module:
    """``peft.get_peft_model`` plus, when ``train_dataset`` is given, the FishIRD ``prepare`` step.

    Switching a LoRA script is then a two-line change: the import and this call::

        from peft_fish_ird import FishIRDConfig, get_peft_model
        model = get_peft_model(
            model, FishIRDConfig(task_type="SEQ_CLS"), train_dataset=train_ds, data_collator=collator
        )
    """
    import peft

    from .config import FishIRDConfig

    peft_model = peft.get_peft_model(model, peft_config, adapter_name=adapter_name, **kwargs)
    if train_dataset is not None:
        if not isinstance(peft_config, FishIRDConfig):
            raise TypeError(
                f"train_dataset is used to prepare a FishIRD mask, but the config is a {type(peft_config).__name__}; "
                "drop train_dataset or pass a FishIRDConfig."
            )
        peft_model.prepare(
            train_dataset, data_collator=data_collator, adapter_name=adapter_name, **(prepare_kwargs or {})
        )
    elif prepare_kwargs:
        raise ValueError("prepare_kwargs were given without train_dataset; pass train_dataset=... to prepare.")
    return peft_model
