"""``compression.qat``: quantization-aware training (the ``qat`` stage)."""

from __future__ import annotations

from dataclasses import dataclass, field

from patholite.config.compression.base import FinetuneConfig


@dataclass
class QatConfig:
    """Quantization-aware fine-tuning of the trained model. ``method``: ``lite`` is R2's QAT-lite (torch.ao
    fake quantization, then a real INT8 conversion for the machine's torch.ao engine,
    ``accelerator.int8_engine``); ``lsq`` is LSQ (learned step sizes, ``compress/lsq.py``), exported as a
    QDQ ONNX file with the learned scales for ONNX Runtime (or OpenVINO)."""

    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=5, lr=5e-5))
    method: str = "lite"  # lite | lsq
    weight_bits: int = 8  # lsq: 8 (per output channel) or 4 (per block of block_size input weights)
    act_bits: int = 8  # lsq: Linear inputs at 8 bits (per tensor), or 32 to keep them float
    block_size: int = 32  # lsq at 4 bits: weights per step, the block of ONNX Runtime's MatMulNBits
    calibration_batches: int = 8  # lsq: training batches (evaluation transform) that set activation steps
    engine: str | None = None  # moved to accelerator.int8_engine: set, it is refused with that name


SCHEMA = QatConfig
