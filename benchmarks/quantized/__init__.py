"""FishIRD vs QLoRA on a quantized base: ``python -m benchmarks.quantized`` (see ``__main__``)."""
