"""Zero-shot accuracy of a profile's untrained causal LM (``"head": "lm"``) on its test and
validation splits, with the benchmark's own splits, prompt and answer scoring (``run.evaluate``).

    python -m benchmarks.quality.zero_shot --profile smollm2_lm

Writes ``<output_dir>/zero_shot.json`` (and prints it): the level every method starts from.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

from benchmarks.common import atomic_write_json
from benchmarks.quality.models import load_model
from benchmarks.quality.plan import DEFAULT_CONFIG, BenchmarkError, head_of, load_profile
from benchmarks.quality.run import Context, environment, evaluate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.zero_shot", description=__doc__.split("\n")[0])
    p.add_argument("--profile", default="smollm2_lm")
    args = p.parse_args(argv)
    profile = load_profile(DEFAULT_CONFIG, args.profile)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = {"profile": args.profile, "env": environment(), "at": when}
    ctx = Context(device="cpu")
    for exp in profile.experiments:
        if head_of(exp) != "lm":
            raise BenchmarkError(f'Experiment {exp.name!r} has no causal-LM head: zero-shot needs "head": "lm".')
        for task in exp.tasks:
            data = ctx.task_data(exp, task)
            model = load_model(ctx.location(exp), data.num_labels, ctx.tokenizer(exp), 0, "cpu", head_of(exp))
            batch = exp.settings["eval_batch_size"]
            out[f"{exp.model}/{task}"] = {
                "settings_id": exp.settings_id,
                "test": evaluate(model, data.test, data.collator, batch, data.choices),
                "validation": evaluate(model, data.validation, data.collator, batch, data.choices),
            }
    atomic_write_json(profile.output_dir / "zero_shot.json", out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
