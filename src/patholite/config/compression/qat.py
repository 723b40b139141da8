"""``compression.qat``: quantization-aware training (the ``qat`` stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from patholite.config.compression.base import FinetuneConfig


@dataclass
class QatConfig:
    """R2's QAT-lite: fake-quantized fine-tuning of the trained model, then a real INT8 conversion for the
    machine's torch.ao engine (``accelerator.int8_engine``)."""

    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=5, lr=5e-5))
    engine: str | None = None  # moved to accelerator.int8_engine: set, it is refused with that name


SCHEMA = QatConfig
