"""Speed and memory of FishIRD against its references, as ratios measured in one run.

Run from the repository root. Command (CPU, ~25 minutes on 2 cores; writes benchmarks/results/speed.{json,md,png}):
    python -m benchmarks.speed
On a GPU (absolute times meaningful there):
    python -m benchmarks.speed --device cuda --output benchmarks/results/speed_cuda

What is measured (all-MiniLM-L6-v2, 64 tokens; methods interleaved, medians of --repeats):
* Fisher: the batched engine vs one plain forward+backward pass over the same samples at the
  same batch size, the batch-size-1 loop (FISH reference) and torch.func vmap(grad); exactness
  of the engine vs the loop and identity of the top-0.5% masks.
* ``prepare`` end to end at 128 and 1024 samples (``--prepare-samples``) vs one plain pass over the
  same collated batches, with where its time goes (drawing and collating, the engine, the rest).
* Training step (batch 16, AdamW): FishIRD (fast path; fast path with keep_effective_weight=True,
  which keeps each layer's W0 + delta from forward for backward; the slow reference path) with
  keep_ratio matched to LoRA r=8 on query/key/value/dense, vs LoRA, full fine-tuning, the FISH
  reference's dense masked gradients and PEFT's SHiRA; each timing covers --steps-per-timing steps.
  Peak RSS (or CUDA peak memory) of three steps per method, the median of --memory-repeats fresh
  processes, counted from the RSS left after glibc's ``malloc_trim``; optimizer state bytes.
* Values-gradient strategies: per Linear layer of the prepared model, the time of each way to form
  the values' gradient vs the one the autotune picks (``MatrixPattern.tune``) and the one the cost
  model picks (``sparse_ops.choose_strategy``, the fallback).
* IRD overhead: total Fisher time of an IRD search vs one FISH Fisher pass, scoring reported apart.
* Adapter file size vs k x (4 + index bytes) + head bytes (indices are saved as int32).
"""

LORA_TARGETS = ["query", "key", "value", "dense"]
TRAIN_METHODS = ("lora", "fishird", "fishird_keep", "fishird_reference", "full", "fish_dense_mask", "shira")
