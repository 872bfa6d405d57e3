"""Fisher section: the engine vs one plain pass, the batch-size-1 loop and torch.func vmap(grad)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from benchmarks.speed.harness import interleaved, load_model, make_batches, paired_quartiles, targets_of
from peft_fish_ird.fisher import compute_fisher, output_logits, per_sample_losses
from peft_fish_ird.reference import fisher_loop
from peft_fish_ird.selection import select


def vmap_fisher(model, batches, targets, chunk: int) -> dict[str, torch.Tensor]:
    """torch.func per-sample gradients (vmap over grad) in chunks: the generic alternative."""
    names = [f"{n}.{p}" for n, m in targets.items() for p in ("weight", "bias") if getattr(m, p, None) is not None]
    params = dict(model.named_parameters())
    chosen = {k: params[k].detach() for k in names}
    rest = {k: v.detach() for k, v in params.items() if k not in chosen}
    buffers = dict(model.named_buffers())

    def loss(p, ids, label):  # unpadded batches: HF's mask construction has data-dependent branches vmap rejects
        out = functional_call(model, {**rest, **p, **buffers}, (), {"input_ids": ids[None]})
        return per_sample_losses(output_logits(out), label[None])[0]

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    scores = {k: torch.zeros_like(v) for k, v in chosen.items()}
    for b in batches:
        if not bool(b["attention_mask"].all()):
            raise ValueError("vmap_fisher needs unpadded batches")
        for s in range(0, b["input_ids"].shape[0], chunk):
            g = per_sample(chosen, b["input_ids"][s : s + chunk], b["labels"][s : s + chunk])
            for k in scores:
                scores[k] += g[k].square().sum(0)
    return scores


def bench_fisher(args) -> dict[str, Any]:
    device = args.device
    model = load_model(device).eval()
    eager = load_model(device, eager=True).eval()
    batches = make_batches(args.fisher_samples, args.fisher_batch, args.tokens, device, pad=False)
    targets = targets_of(model)

    def plain():
        for p in model.parameters():
            p.requires_grad_(True)
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    results: dict[str, Any] = {}
    fns = {
        "plain_pass": plain,
        # as plain FISH runs it (no per-sample scores), and as IRD's rounds run it (with s_n)
        "engine": lambda: results.__setitem__(
            "engine", compute_fisher(model, batches, targets, progress=False, sample_scores=False)
        ),
        "engine_with_sample_scores": lambda: compute_fisher(model, batches, targets, progress=False),
        "vmap_chunk8": lambda: results.__setitem__("vmap", vmap_fisher(eager, batches, targets_of(eager), 8)),
    }
    if not args.skip_loop:
        fns["loop_bs1"] = lambda: results.__setitem__("loop", fisher_loop(model, batches, targets))
    times = interleaved(fns, args.repeats_fisher, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {
        "samples": args.fisher_samples,
        "batch": args.fisher_batch,
        "tokens": args.tokens,
        "seconds_median": med,
        "ratio_to_plain_pass": {k: v / med["plain_pass"] for k, v in med.items()},
        "ratio_to_plain_pass_paired_quartiles": paired_quartiles(times, "plain_pass"),
        "seconds_all": times,
    }
    engine = results["engine"].scores
    k = int(0.005 * sum(p.numel() for p in model.parameters()))
    mask_engine = select(engine, k)
    if "loop" in results:
        loop = results["loop"].scores
        scale = max(float(v.abs().max()) for v in loop.values())
        out["engine_max_rel_error_vs_loop"] = max(
            float((engine[n].cpu() - loop[n].cpu()).abs().max()) / max(float(loop[n].abs().max()), 1e-9 * scale)
            for n in loop
        )
        mask_loop = select({n: v.cpu() for n, v in loop.items()}, k)
        out["top_0.5pct_mask_identical_to_loop"] = all(
            torch.equal(mask_engine[n].cpu(), mask_loop[n]) for n in mask_loop
        )
        out["engine_speedup_vs_loop"] = med["loop_bs1"] / med["engine"]
    return out


def bench_prepare(args) -> dict[str, Any]:
    """``prepare`` end to end (drawing and collating the samples, the Fisher pass, the selection,
    filling the layers) against one plain forward+backward pass over the same collated batches,
    at each of ``args.prepare_samples`` sample counts; and where prepare's time goes."""
    from peft import get_peft_model

    from benchmarks.speed.harness import as_examples, collate
    from peft_fish_ird import FishIRDConfig
    from peft_fish_ird.data import fisher_batches, move_to

    device, out = args.device, {}
    for n in args.prepare_samples:
        examples = as_examples(make_batches(n, args.fisher_batch, args.tokens, "cpu", seed=5))
        # prepare against one plain pass: the Fisher's data, pass and selection, no head probing
        config = FishIRDConfig(
            task_type="SEQ_CLS", num_samples=n, fisher_batch_size=args.fisher_batch, head_probe_steps=0
        )
        model = get_peft_model(load_model(device), config)
        draw = dict(model=model, num_samples=n, seed=0, batch_size=args.fisher_batch, data_collator=collate)
        batches = [move_to(b, device) for b in fisher_batches(examples, **draw).batches]
        plain_model = load_model(device)
        records = []

        def plain() -> None:
            for p in plain_model.parameters():
                p.requires_grad_(True)
            for b in batches:
                plain_model(**b).loss.backward()
            plain_model.zero_grad(set_to_none=True)

        def prepare() -> None:
            records.append(model.prepare(examples, data_collator=collate, progress=False))

        times = interleaved({"plain_pass": plain, "prepare": prepare}, args.repeats_prepare, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        start = time.perf_counter()
        fisher_batches(examples, **draw)
        draw_seconds = time.perf_counter() - start
        timed = records[-len(times["prepare"]) :]  # the timed calls' records (the first call warmed up)
        fisher_seconds = statistics.median(r.fisher_seconds for r in timed)
        # the rest per call (that call's time minus its own engine time), then the median: never the
        # difference of two medians of different calls, which can come out negative
        rest_seconds = statistics.median(t - r.fisher_seconds for t, r in zip(times["prepare"], timed)) - draw_seconds
        out[str(n)] = {
            "samples": n,
            "seconds_median": med,
            "ratio_to_plain_pass": med["prepare"] / med["plain_pass"],
            "ratio_paired_quartiles": paired_quartiles(times, "plain_pass")["prepare"],
            "breakdown_seconds": {
                "draw_and_collate": draw_seconds,
                "fisher_engine": fisher_seconds,
                "selection_fill_and_checks": rest_seconds,
            },
            "seconds_all": times,
        }
    return out
