"""Quality benchmark: FISH vs IRD (and its controls) vs LoRA vs full fine-tuning at equal trainable budgets.

Command (the default profile, protocol v2: offline, 171 runs, about 2.4 hours on 2 free CPU cores;
see benchmarks/README.md, "Quality benchmark"):
    python -m benchmarks.quality

Run from the repository root. Other uses:
    python -m benchmarks.quality --smoke --output-dir /tmp/quality_smoke     # ~1 minute; what the tests run
    python -m benchmarks.quality --model minilm --tasks movie --methods fish,ird --seeds 0   # a slice
    python -m benchmarks.quality --only-report                                # rebuild quality.md and plots
    python -m benchmarks.quality --list                                       # show the plan, run nothing
    python -m benchmarks.quality --full                                       # paper scale: bert-base, GLUE, GPU
    python -m benchmarks.quality --profile legacy_v1                          # the first protocol (fixed rates)

Every finished run is appended at once (atomically) to <output-dir>/quality.json; a rerun skips the
runs already there (same task, model, method, budget, seed and settings), so an interrupted run
resumes. Settings come from the profile of benchmarks/quality/config.json chosen by --profile
(--smoke, --full); --tasks / --methods / --keep-ratios / --seeds replace the lists of the chosen
experiments, --experiments keeps the named ones (an experiment marked "optional" in the config runs
only when named) and --model names a configured model (keep only its experiments) or a path / hub
name (run the selected experiments on it). After the runs, <output-dir>/quality.md and the plots
are rebuilt from the JSON (report.py, plots.py).

Methods: FISH (``FishIRDConfig(selection="fish")``: empirical Fisher over ``num_samples`` random
training samples, global top-k, head in the budget), IRD (``"ird"``) and its controls
(``"ird_reverse"``, ``"ird_random"``), a random mask (``"random"``), LoRA with the rank and target
modules whose trainable count (head included) is closest to FISH's, and full fine-tuning. Each
task is split once (``split_seed``) into test / selection / validation / train: the test split is
only used for the final metric; IRD scores its candidates on the selection split; the validation
split (carved from the training data) chooses each method's learning rate from its grid (on the
grid seed; ``phases.py``) and records a validation curve; every method trains on the train split.
A run's seed sets the head initialisation, the Fisher samples and the training order.
"""
