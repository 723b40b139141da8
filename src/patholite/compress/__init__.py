"""The compression techniques, as functions on networks: distillation losses, EMA, quantization, pruning,
low-rank attention. Pipelines (``patholite.pipelines``) order them into stages; this package knows nothing of
Hydra, runs or records."""
