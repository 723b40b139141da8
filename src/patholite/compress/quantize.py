"""Post-training quantization: static INT8 through ONNX Runtime, R1's symmetric quantizer and its per-layer
sensitivity pass, a mixed INT8/FP32 plan under an accuracy budget, and dynamic INT8 of chosen Linear layers.

torch.ao artifacts stay INT8 or FP32 per layer (torch.ao has no 4-bit Linear kernel for CPU); with ``int4``
the plan also chooses real 4-bit layers, which ONNX Runtime runs (``compress/int4.py``).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized.modules.conv import _ConvNd

from patholite.compress.int4 import DEFAULT_BLOCK_SIZE, check_bits, check_block_size, fake_int4_layers
from patholite.errors import CheckpointError, ConfigError
from patholite.io import atomic_path

# ONNX op types quantized statically by default: the Linear layers (MatMul/Gemm) and the patch embedding
# (Conv); LayerNorm, Softmax and GELU stay float as in R2 (R4: they are where ViT accuracy is lost).
STATIC_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
_QUANT_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
_CALIBRATE = {
    "minmax": "MinMax",
    "entropy": "Entropy",
    "percentile": "Percentile",
    "distribution": "Distribution",
}
_METRICS = {"kl": "kl", "accuracy": "accuracy_drop_pp", "accuracy_drop_pp": "accuracy_drop_pp"}

LOW_BIT_NOTE = (
    "Rows below 8 bits come from R1's fake quantizer (weights only, per tensor) and rank how much each layer "
    "tolerates fewer bits; the artifact itself is INT8/FP32 because torch.ao has no 4-bit Linear kernel for "
    "CPU. A working 4-bit path exists outside torch.ao: ONNX Runtime's MatMulNBitsQuantizer "
    "(onnxruntime.quantization.matmul_nbits_quantizer) rewrites the float ONNX MatMuls into block-wise "
    "weight-only 4-bit MatMulNBits nodes (nodes_to_exclude keeps chosen layers in float); torch's private "
    "aten._weight_int4pack_mm_for_cpu also runs on x86 but has no module or serialisation around it. "
    "The ptq method mixed_int4 builds that ONNX artifact (compress/int4.py)."
)
INT4_NOTE = (
    "A 4-bit plan: layer_bits are the widths of the ONNX artifact (4: MatMulNBits block-wise INT4, 8: ORT "
    "dynamic INT8, 32: float). Rows of sensitivity below 8 bits come from R1's per-tensor fake quantizer and "
    "only rank layers; each accepted 4-bit layer was judged with the runtime's own block-wise weights."
)


# ----------------------------------------------------------------------------------------- static ORT
def _batch_images(batch: Any) -> torch.Tensor:
    # A DataLoader yields (images, labels): accept both that and a bare image tensor.
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.ndim < 1:
        raise ConfigError(
            f"calibration batches must be image tensors (N, C, H, W) or (images, labels) pairs; got "
            f"{type(batch).__name__}"
        )
    return batch


class _Batches:
    """ORT's CalibrationDataReader protocol over image batches already in memory (numpy, float32)."""

    def __init__(self, name: str, arrays: list) -> None:
        self.name = name
        self._arrays = arrays
        self._it: Iterator | None = None

    def get_next(self) -> dict | None:
        if self._it is None:
            self._it = iter(self._arrays)
        array = next(self._it, None)
        return None if array is None else {self.name: array}

    def rewind(self) -> None:
        self._it = None


def _onnx_input_name(path: Path) -> str:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others for unreadable files
        raise CheckpointError(f"{path} is not a readable ONNX model: {err}") from err
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ConfigError(
            f"{path} has inputs {inputs}; static quantization needs a model with one image input"
        )
    return inputs[0]


def quantize_static_ort(
    float_onnx: Path,
    out_path: Path,
    calibration: Iterable[torch.Tensor],
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    activation_type: str = "uint8",
    weight_type: str = "int8",
    calibrate_method: str = "minmax",
    op_types: Sequence[str] = STATIC_OP_TYPES,
    preprocess: bool = True,
) -> None:
    """Static INT8 (QDQ format) of a float ONNX model, calibrated on ``calibration``'s image batches.

    Weights and activations get INT8 scales fixed ahead of time from the calibration images (a batch may be
    an image tensor or an ``(images, labels)`` pair). Only ``op_types`` are quantized: by default MatMul,
    Gemm and Conv, so LayerNorm, Softmax and GELU stay float (R2). ``out_path`` is replaced atomically.

    Data types: the default U8S8 (uint8 activations, int8 weights) can saturate on x86 CPUs with AVX2 but
    without VNNI (e.g. AMD Zen 3), whose int8 dot product (vpmaddubsw) adds pairs into int16. Either
    ``reduce_range=True`` (7-bit weights) or U8U8 (``weight_type="uint8"``) avoids it; on VNNI or AVX-512
    machines the default is right.
    """
    import onnxruntime.quantization as ortq
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for label, value, allowed in (
        ("activation_type", activation_type, _QUANT_TYPES),
        ("weight_type", weight_type, _QUANT_TYPES),
        ("calibrate_method", calibrate_method, _CALIBRATE),
    ):
        if value not in allowed:
            raise ValueError(f"quantize_static_ort: {label}={value!r} is not one of {sorted(allowed)}")
    if activation_type == "int8" and weight_type == "uint8":
        raise ValueError(
            "quantize_static_ort: int8 activations with uint8 weights (S8U8) have no ONNX Runtime kernels; "
            "use uint8/int8, uint8/uint8 or int8/int8"
        )
    float_onnx, out_path = Path(float_onnx), Path(out_path)
    if not float_onnx.is_file():
        raise CheckpointError(
            f"float ONNX model {float_onnx} does not exist; export it first (save_onnx_artifact)"
        )
    arrays = [_batch_images(b).detach().to("cpu", torch.float32).numpy() for b in calibration]
    images = sum(a.shape[0] for a in arrays)
    if images == 0:
        raise ValueError(
            "quantize_static_ort got zero calibration images: static INT8 needs images to fix activation "
            "scales"
        )
    name = _onnx_input_name(float_onnx)

    with tempfile.TemporaryDirectory(prefix="patholite-ptq-") as tmp:
        source = float_onnx
        if preprocess:
            # Symbolic shape inference + ORT graph optimisation before quantizing, as ORT recommends.
            # Measured: works on timm ViTs exported by torch.onnx (opset 17, TorchScript exporter); it halves
            # DeiT-Tiny's node count (955 -> 476). Optional and non-fatal: it only helps.
            pre = Path(tmp) / "preprocessed.onnx"
            try:
                quant_pre_process(str(float_onnx), str(pre))
                source = pre
            except Exception as err:  # noqa: BLE001 - shape inference fails in many ways on exotic graphs
                warnings.warn(
                    f"ONNX Runtime's quant_pre_process failed on {float_onnx} ({err}); quantizing the model "
                    "as exported",
                    stacklevel=2,
                )
        with atomic_path(out_path) as part, _quiet_ort_logging():
            ortq.quantize_static(
                str(source),
                str(part),
                _Batches(name, arrays),
                quant_format=ortq.QuantFormat.QDQ,
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=getattr(ortq.QuantType, _QUANT_TYPES[activation_type]),
                weight_type=getattr(ortq.QuantType, _QUANT_TYPES[weight_type]),
                calibrate_method=getattr(ortq.CalibrationMethod, _CALIBRATE[calibrate_method]),
            )


def quantize_dynamic_ort(
    float_onnx: Path, out_path: Path, *, per_channel: bool = False, reduce_range: bool = False
) -> None:
    """Dynamic INT8 through ONNX Runtime: INT8 weights, activation scales computed per batch at run time
    (no calibration), MatMul/Gemm only, so LayerNorm, Softmax and GELU stay float (R2's choice, ORT's
    kernels). ``out_path`` is replaced atomically."""
    import onnxruntime.quantization as ortq

    float_onnx, out_path = Path(float_onnx), Path(out_path)
    if not float_onnx.is_file():
        raise CheckpointError(
            f"float ONNX model {float_onnx} does not exist; export it first (save_onnx_artifact)"
        )
    with atomic_path(out_path) as part, _quiet_ort_logging():
        ortq.quantize_dynamic(
            str(float_onnx),
            str(part),
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=ortq.QuantType.QInt8,
        )


@contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    # The quantizer logs advice through the root logger at WARNING for every node; keep only errors.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


# ----------------------------------------------------------------------------------------- R1 quantizer
def symmetric_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """R1's symmetric uniform fake-quantizer, per tensor: round(x / D) * D with D = max|x| / (2^(b-1) - 1).

    The result has at most 2^(b-1) - 1 positive levels; gradients pass straight through (STE), so it can
    also be used in training. An all-zero tensor comes back unchanged.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(f"symmetric_quantize: bits={bits!r} must be an integer >= 2 (b=1 has no levels)")
    levels = 2 ** (bits - 1) - 1
    scale = x.detach().abs().max() / levels
    if scale == 0:
        return x.clone()
    q = torch.round(x.detach() / scale) * scale
    return x + (q - x).detach()


# ----------------------------------------------------------------------------------------- sensitivity
def _linear_names(net: nn.Module) -> list[str]:
    return [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]


def _check_layers(net: nn.Module, layers: Iterable[str] | None) -> list[str]:
    linear = _linear_names(net)
    if layers is None:
        return linear
    layers = list(layers)
    wrong = [name for name in layers if name not in set(linear)]
    if wrong:
        raise ConfigError(
            f"{wrong} are not nn.Linear layers of this network; its Linear layers are e.g. {linear[:4]} "
            f"({len(linear)} in all)"
        )
    return layers


def _check_batches(batches: Sequence) -> None:
    if not batches:
        raise ConfigError("no validation batches: the sensitivity pass needs (images, labels) batches")
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise ConfigError("validation batches must be (images, labels) pairs")


@torch.no_grad()
def _outputs(net: nn.Module, batches: Sequence) -> tuple[list[torch.Tensor], float]:
    """Log-softmax outputs per batch (on CPU) and top-1 accuracy in percent."""
    device = next(net.parameters(), torch.empty(0)).device
    outs, correct, total = [], 0, 0
    for x, y, *_ in batches:
        logp = F.log_softmax(net(x.to(device)).float(), dim=-1).cpu()
        outs.append(logp)
        correct += int((logp.argmax(-1) == y.cpu()).sum())
        total += len(y)
    return outs, 100.0 * correct / max(total, 1)


def _mean_kl(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over images of KL(p_ref || p_other), from log-probabilities."""
    total = sum(
        F.kl_div(o, r, log_target=True, reduction="sum").item() for r, o in zip(ref, other, strict=True)
    )
    return max(total / sum(len(r) for r in ref), 0.0)


def layer_sensitivity(
    net: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    bits: Sequence[int] = (8, 4),
    layers: list[str] | None = None,
) -> list[dict]:
    """R1's task sensitivity: quantize one Linear layer's weight at a time and measure what the task loses.

    For each layer (default: every nn.Linear, by qualified name) and bit width, only that layer's weight is
    fake-quantized with ``symmetric_quantize`` (restored afterwards). Rows hold the top-1 accuracy drop on the
    batches' labels in percentage points (float net minus quantized; negative when it helps) and the mean
    KL(float || quantized) of the softmax outputs. Cost: one float pass plus one pass per layer and width.
    """
    return _sensitivity(net, batches, bits, layers)[0]


def _sensitivity(
    net: nn.Module, batches: Sequence, bits: Sequence[int], layers: list[str] | None
) -> tuple[list[dict], float]:
    """``layer_sensitivity``'s rows and the float net's accuracy (percent) on the batches."""
    _check_batches(batches)
    for b in bits:
        symmetric_quantize(torch.zeros(1), b)  # validates every width before any pass
    layers = _check_layers(net, layers)
    modules = dict(net.named_modules())
    was_training = net.training
    net.eval()
    try:
        ref, ref_acc = _outputs(net, batches)
        rows = []
        for name in layers:
            weight = modules[name].weight
            original = weight.detach().clone()
            try:
                for b in bits:
                    with torch.no_grad():
                        weight.copy_(symmetric_quantize(original, b))
                    outs, acc = _outputs(net, batches)
                    rows.append(
                        {
                            "layer": name,
                            "bits": int(b),
                            "accuracy_drop_pp": ref_acc - acc,
                            "kl": _mean_kl(ref, outs),
                        }
                    )
            finally:
                with torch.no_grad():
                    weight.copy_(original)
    finally:
        net.train(was_training)
    return rows, ref_acc


# ----------------------------------------------------------------------------------------- dynamic INT8
def _check_engine(engine: str) -> None:
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise ValueError(f"INT8 engine {engine!r} is not supported by this torch; it has {supported}")


def quantize_dynamic_int8(net: nn.Module, engine: str = "x86", layers: list[str] | None = None) -> nn.Module:
    """torch.ao dynamic INT8 of the Linear layers (``layers``: only these, by qualified name; mixed
    precision); LayerNorm and Softmax stay in float (R2's protocol). Returns a quantized copy."""
    torch.backends.quantized.engine = engine
    names = {name for name, m in net.named_modules() if isinstance(m, nn.Linear)}
    unknown = sorted(set(layers or ()) - names)
    if unknown:
        raise CheckpointError(f"dynamic INT8: {unknown} are not Linear layers of the network")
    spec: set = {nn.Linear} if layers is None else set(layers)
    with warnings.catch_warnings():
        # torch.ao.quantization and quantized tensors are deprecated; both still work in torch 2.14.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(net.eval(), spec, dtype=torch.qint8)


def quantize_dynamic_layers(net: nn.Module, layers: list[str] | None, engine: str = "x86") -> nn.Module:
    """A CPU copy of ``net`` (eval) with dynamic INT8 (torch.ao) of the named Linear layers; None: all Linear.

    Weights become INT8 (per tensor), activations are quantized on the fly; everything else stays float.
    ``net`` itself is left as it was.
    """
    _check_engine(engine)
    names = _check_layers(net, layers)
    qnet = copy.deepcopy(net).cpu().eval()
    return quantize_dynamic_int8(qnet, engine, names) if names else qnet


def int8_layer_names(net: nn.Module) -> list[str]:
    """Names of the modules that run real INT8 kernels: torch.ao quantized (static or dynamic) Linear/Conv."""
    # nnq.dynamic.Linear subclasses nnq.Linear; their LinearPackedParams children are not layers.
    return [name for name, m in net.named_modules() if isinstance(m, (nnq.Linear, _ConvNd))]


# ----------------------------------------------------------------------------------------- the plan
def mixed_precision_plan(
    net: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    budget_pp: float = 0.5,
    metric: str = "kl",
    bits: Sequence[int] = (8, 4),
    engine: str = "x86",
    layers: Sequence[str] | None = None,
    int4: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = False,
) -> dict[str, Any]:
    """R1's heterogeneous precision as INT8/FP32 per Linear layer (with ``int4``: INT4/INT8/FP32), within
    an accuracy budget.

    Layers are ranked by their 8-bit sensitivity (``metric``: "kl" or "accuracy", ties broken by the other
    one), then added to the INT8 set from least to most sensitive. Each addition is checked for real: the
    chosen set is quantized with dynamic INT8 (``quantize_dynamic_layers``) and its top-1 accuracy on the
    batches compared with the float net's; a layer whose addition would push the drop above ``budget_pp``
    stays float and the next one is tried (greedy with skipping). Returns a JSON-serialisable plan; the
    lower-bit rows of ``sensitivity`` inform it, see ``note``. ``layers``: only these may be quantized (the
    others stay float; e.g. those ONNX Runtime can rewrite).

    ``int4`` (``bits`` must then be 8 and 4) adds a second pass for real 4-bit weights
    (``compress/int4.py``): the INT8 layers, ranked by their 4-bit sensitivity, are moved to block-wise INT4
    (``block_size``, ``symmetric``, the very weights ONNX Runtime's MatMulNBits will use) one at a time,
    each kept only if the whole mix (INT4 weights in torch, the other INT8 layers dynamic INT8) still stays
    within ``budget_pp``; the float layers are tried too (block-wise scales tolerate outliers that per-tensor
    INT8 does not). INT8 first because it saves the most bytes for the least error (3 of a weight's 4
    bytes; 4 bits save a further 0.4 with their scales). INT8 candidates are judged with torch.ao dynamic
    INT8 (per tensor, as the artifact's ORT dynamic INT8). The plan then has ``int4_layers`` and
    ``layer_bits`` (layer -> 4, 8 or 32 for float).
    """
    if metric not in _METRICS:
        raise ValueError(f"mixed_precision_plan: metric={metric!r} is not one of {sorted(_METRICS)}")
    if 8 not in bits:
        raise ValueError(f"mixed_precision_plan: bits={list(bits)} must include 8 (the plan ranks INT8 rows)")
    if budget_pp < 0:
        raise ValueError(f"mixed_precision_plan: budget_pp={budget_pp} must be >= 0 (percentage points)")
    if int4:  # real kernels exist for these two widths only: fail before the passes
        check_bits(bits, "mixed_precision_plan: bits")
        check_block_size(block_size)
        if 4 not in bits:
            raise ConfigError(f"mixed_precision_plan: bits={list(bits)} must include 4 for a 4-bit plan")
    _check_engine(engine)
    _check_batches(batches)
    # Everything on one CPU copy, so the float reference and the INT8 candidates run the same kernels' world.
    ref_net = copy.deepcopy(net).cpu().eval()
    allowed = set(_check_layers(ref_net, layers))
    rows, ref_acc = _sensitivity(ref_net, batches, bits, None)
    key, other = _METRICS[metric], "kl" if _METRICS[metric] == "accuracy_drop_pp" else "accuracy_drop_pp"

    def ranked(width: int) -> list[str]:
        at = [r for r in rows if r["bits"] == width and r["layer"] in allowed]
        return [r["layer"] for r in sorted(at, key=lambda r: (r[key], r[other], r["layer"]))]

    ranking = ranked(8)

    chosen: list[str] = []
    drop = 0.0
    trials = []
    for name in ranking:
        candidate = chosen + [name]
        _, acc = _outputs(quantize_dynamic_layers(ref_net, candidate, engine), batches)
        accepted = ref_acc - acc <= budget_pp
        trials.append({"layer": name, "accuracy_drop_pp": ref_acc - acc, "accepted": accepted})
        if accepted:
            chosen, drop = candidate, ref_acc - acc
    order = _linear_names(ref_net)
    plan: dict[str, Any] = {}
    if int4:
        at4: list[str] = []
        trials4 = []
        # float layers too: block-wise INT4 can hold a layer per-tensor INT8 could not (an outlier weight
        # coarsens one block's grid, not the whole tensor's)
        for name in ranked(4):
            candidate = at4 + [name]
            mixed = fake_int4_layers(copy.deepcopy(ref_net), candidate, block_size, symmetric)
            rest = [n for n in chosen if n not in set(candidate)]
            _, acc = _outputs(quantize_dynamic_layers(mixed, rest, engine), batches)
            accepted = ref_acc - acc <= budget_pp
            trials4.append({"layer": name, "accuracy_drop_pp": ref_acc - acc, "accepted": accepted})
            if accepted:
                at4, drop = candidate, ref_acc - acc
        chosen = [n for n in chosen if n not in set(at4)]
        plan = {
            "int4_layers": [n for n in order if n in set(at4)],
            "block_size": int(block_size),
            "symmetric": bool(symmetric),
            "trials_int4": trials4,
        }
        plan["layer_bits"] = {n: 4 if n in set(at4) else 8 if n in set(chosen) else 32 for n in order}
    return {
        **plan,
        "int8_layers": [n for n in order if n in set(chosen)],
        "float_layers": [
            n for n in order if n not in set(chosen) and n not in set(plan.get("int4_layers", ()))
        ],
        "budget_pp": float(budget_pp),
        "accuracy_drop_pp": float(drop),
        "float_accuracy": float(ref_acc),
        "images": int(sum(len(b[1]) for b in batches)),
        "metric": metric,
        "bits": [int(b) for b in bits],
        "engine": engine,
        "ranking": ranking,
        "trials": trials,
        "sensitivity": rows,
        "note": INT4_NOTE if int4 else LOW_BIT_NOTE,
    }
