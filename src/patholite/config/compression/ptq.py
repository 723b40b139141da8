"""``compression.ptq``: post-training INT8 quantization (the ``ptq`` stage)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PtqConfig:
    """Post-training INT8 quantization of the stage's float model. The torch.ao engine is the machine's:
    ``accelerator.int8_engine``."""

    # dynamic (torch.ao, R2) | dynamic_ort (ONNX Runtime) | static_ort (ORT QDQ, calibrated) | mixed (R1)
    # | nncf (NNCF INT8 on OpenVINO) | nncf_accuracy (NNCF with accuracy control, budget_pp)
    # | ov_fp32 / ov_bf16 (the float model on OpenVINO, precision hint f32 / bf16); OpenVINO: the extra
    # | mixed_int4 (R1's plan over INT4/INT8/FP32, an ONNX Runtime artifact with real 4-bit weights)
    # | bf16 (the float weights run by torch under CPU bf16 autocast; CPUs with native bf16 only)
    methods: list[str] = field(default_factory=lambda: ["dynamic"])
    calibration_images: int = 256  # static_ort, nncf, nncf_accuracy: training images fed to the calibrator
    per_channel: bool = True  # static_ort: per-channel weight scales
    reduce_range: bool = False  # static_ort: 7-bit weights, avoids U8S8 saturation on AVX2 without VNNI
    weight_type: str = "int8"  # static_ort: int8 (U8S8) | uint8 (U8U8)
    budget_pp: float = 0.5  # mixed, nncf_accuracy: largest accuracy drop (pp) on validation images
    sensitivity_images: int = 256  # mixed, nncf_accuracy: validation images the accuracy is measured on
    bits: list[int] = field(default_factory=lambda: [8, 4])  # mixed: R1's quantizer widths in the pass
    # nncf*: precision hint of what NNCF leaves in float: auto (bf16 where the CPU has it natively, OpenVINO's
    # own default there, else f32; the sidecar records the choice) | f32 | bf16
    openvino_precision: str = "auto"
    block_size: int = 32  # mixed_int4: weights per INT4 block (one fp32 scale each); a power of two >= 16
    symmetric: bool = False  # mixed_int4: INT4 without zero points (smaller file, larger error)
    engine: str | None = None  # moved to accelerator.int8_engine: set, it is refused with that name


SCHEMA = PtqConfig
