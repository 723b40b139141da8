"""Real 4-bit weights: ONNX Runtime's weight-only block-wise INT4 (the ``MatMulNBits`` contrib op) mixed with
ORT dynamic INT8 and FP32, one precision per Linear layer, in one ``.onnx`` file.

A plan maps each ``nn.Linear`` (qualified name) to 4, 8 or 32 bits (32: kept float). The float ONNX export
is rewritten in two passes: ``MatMulNBitsQuantizer`` turns the 4-bit layers' MatMuls into ``MatMulNBits``
(weights in blocks of ``block_size`` along the input dimension, one fp32 scale and, unless symmetric, one
4-bit zero point per block), then ``quantize_dynamic`` turns the 8-bit layers' MatMuls into
``DynamicQuantizeLinear`` + ``MatMulInteger``; every other node stays float. Both rewrite MatMul only: a
Linear exported as ``Gemm`` (2-D input, e.g. a ViT's classifier head, 0.1% of DeiT-Tiny's weights) stays
float. ``int4_dequantize`` reproduces the runtime's 4-bit weights exactly (ORT's own packing kernel),
so the planner can judge a 4-bit layer in torch without building a file per candidate.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patholite.errors import CheckpointError, ConfigError
from patholite.io import atomic_path

FLOAT_BITS = 32  # a plan's marker for a layer kept in float
KERNEL_BITS = (4, 8)  # what ONNX Runtime runs: MatMulNBits (4) and MatMulInteger (8)
DEFAULT_BLOCK_SIZE = 32
PRECISION = {4: "int4", 8: "int8", FLOAT_BITS: "fp32"}


# ----------------------------------------------------------------------------------------- checks
def check_bits(bits: Any, what: str = "bits") -> None:
    """One clear error for a bit width ONNX Runtime has no kernel for (``bits``: a list, or a plan's
    ``{layer: bits}``; 32 in a plan keeps a layer float)."""
    items = bits.items() if isinstance(bits, Mapping) else ((None, b) for b in bits)
    allowed = (*KERNEL_BITS, FLOAT_BITS) if isinstance(bits, Mapping) else KERNEL_BITS
    for layer, b in items:
        if isinstance(b, bool) or b not in allowed:
            where = f" for layer {layer!r}" if layer is not None else ""
            raise ConfigError(
                f"{what}: bit width {b!r}{where} has no ONNX Runtime kernel; use 4 (INT4 MatMulNBits) or 8 "
                "(INT8 dynamic)" + (", or 32 to keep the layer float" if isinstance(bits, Mapping) else "")
            )


def check_block_size(block_size: int) -> None:
    """MatMulNBits takes blocks of a power of two, at least 16 weights."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16:
        raise ConfigError(f"block_size={block_size!r}: MatMulNBits needs a power of two >= 16 (e.g. 32)")
    if block_size & (block_size - 1):
        raise ConfigError(f"block_size={block_size}: MatMulNBits needs a power of two >= 16 (e.g. 32)")


# ----------------------------------------------------------------------------------------- ORT
@contextmanager
def _quiet_ort() -> Iterator[None]:
    # The quantizers log a line per node at INFO/WARNING (root logger and their own); keep only errors.
    # matmul_nbits_quantizer also calls logging.basicConfig(level=INFO) on import: undo that on the root.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    named = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    named_level = named.level
    root.setLevel(logging.ERROR)
    named.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for handler in root.handlers[len(handlers) :]:
            root.removeHandler(handler)
        root.setLevel(level)
        named.setLevel(named_level)


def int4_dequantize(weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = False):
    """The float weights a ``MatMulNBits`` node computes with for ``weight`` (an ``nn.Linear`` weight,
    out x in): quantized by ONNX Runtime's own kernel (blocks of ``block_size`` along the input dimension,
    one scale per block, a 4-bit zero point unless ``symmetric``) and dequantized. Returns a tensor like
    ``weight``."""
    check_block_size(block_size)
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    b = np.ascontiguousarray(weight.detach().cpu().float().numpy().T)  # MatMul's B: K x N
    rows, cols = b.shape
    k_blocks = -(-rows // block_size)
    if k_blocks * block_size != rows:
        b = np.pad(b, ((0, k_blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, k_blocks, block_size // 2), dtype=np.uint8)
    zero_point = np.zeros((cols, (k_blocks + 1) // 2), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    quantize_matmul_4bits(packed, b, scales, zero_point, block_size, cols, rows, symmetric)
    # two weights a byte, low nibble first; zero points packed the same way, one per block
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(cols, k_blocks, block_size)
    if symmetric:
        zp = np.full((cols, k_blocks, 1), 8, dtype=np.float32)
    else:
        zp = np.stack([zero_point & 0x0F, zero_point >> 4], axis=-1).reshape(cols, -1)[:, :k_blocks]
        zp = zp[..., None].astype(np.float32)
    w = ((q.astype(np.float32) - zp) * scales[..., None]).reshape(cols, -1)[:, :rows]  # N x K = out x in
    return torch.from_numpy(np.ascontiguousarray(w)).to(weight.dtype)


@torch.no_grad()
def fake_int4_layers(
    net: nn.Module, layers: list[str], block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = False
) -> nn.Module:
    """``net`` itself with the named Linear layers' weights replaced by their 4-bit values
    (``int4_dequantize``): what the mixed artifact computes there, in torch (activations stay float in
    MatMulNBits at its default accuracy level, as here)."""
    modules = dict(net.named_modules())
    for name in layers:
        weight = modules[name].weight
        weight.copy_(int4_dequantize(weight, block_size, symmetric))
    return net


# ----------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class OnnxLinear:
    """Where an ``nn.Linear`` went in the ONNX export: its node's name and op type (``MatMul`` with the
    weight transposed as a constant, or ``Gemm`` for 2-D inputs such as a classifier head)."""

    node: str
    op_type: str

    @property
    def quantizable(self) -> bool:
        # MatMulNBitsQuantizer rewrites MatMul only, and ORT's dynamic (integer-op) quantizer has no Gemm.
        return self.op_type == "MatMul"


def _digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


def _scope_name(node_name: str) -> str:
    """The module path the TorchScript exporter put in a node name: ``/blocks/blocks.0/attn/qkv/MatMul``
    -> ``blocks.0.attn.qkv``."""
    qualified = ""
    for part in node_name.strip("/").split("/")[:-1]:
        qualified = (
            part
            if qualified and part.startswith(qualified + ".")
            else ".".join(filter(None, [qualified, part]))
        )
    return qualified


def linear_onnx_nodes(net: nn.Module, float_onnx: Path) -> dict[str, OnnxLinear]:
    """Each ``nn.Linear`` of ``net`` mapped to its node in ``float_onnx`` (exported from ``net``), found by
    its weight's values (names are the exporter's choice); layers not found (fused away) are left out."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(float_onnx))
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others for unreadable files
        raise CheckpointError(f"{float_onnx} is not a readable ONNX model: {err}") from err
    inits = {t.name: t for t in model.graph.initializer}
    found: dict[str, list[tuple[str, str]]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2:
                found.setdefault(_digest(w.T), []).append((node.name, "MatMul"))
        elif node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in inits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2 and not attrs.get("transA", 0):
                found.setdefault(_digest(w if attrs.get("transB", 0) else w.T), []).append(
                    (node.name, "Gemm")
                )
    mapping: dict[str, OnnxLinear] = {}
    for name, module in net.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        nodes = found.get(_digest(module.weight.detach().cpu().numpy()), [])
        if len(nodes) > 1:  # equal weights (e.g. zero-initialised): the exporter's scope names decide
            nodes = [n for n in nodes if _scope_name(n[0]) == name]
        if len(nodes) == 1:
            mapping[name] = OnnxLinear(*nodes[0])
    return mapping


def onnx_layer_precisions(onnx_path: Path, nodes: Mapping[str, OnnxLinear]) -> dict[str, int]:
    """What each layer really is in a quantized ONNX file, read from its graph: 4 (a ``MatMulNBits``
    node), 8 (a ``MatMulInteger`` fed by ``DynamicQuantizeLinear``) or 32 (its float MatMul/Gemm)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    producers = {out: n for n in model.graph.node for out in n.output}
    out: dict[str, int] = {}
    for layer, where in nodes.items():
        if f"{where.node}_Q4" in by_name and by_name[f"{where.node}_Q4"].op_type == "MatMulNBits":
            out[layer] = 4
        elif where.node in by_name and by_name[where.node].op_type == where.op_type:
            out[layer] = FLOAT_BITS
        elif getattr(by_name.get(f"{where.node}_MatMul"), "op_type", None) == "MatMul":
            out[layer] = FLOAT_BITS  # quantize_dynamic splits a Gemm it leaves float into MatMul + Add
        else:
            # ORT's dynamic quantizer names the integer node after the float one
            integer = [
                n
                for n in model.graph.node
                if n.op_type == "MatMulInteger"
                and n.name.startswith(where.node)
                and getattr(producers.get(n.input[0]), "op_type", None) == "DynamicQuantizeLinear"
            ]
            if len(integer) != 1:
                raise CheckpointError(
                    f"{onnx_path}: layer {layer} ({where.node}) is in none of the known forms"
                )
            out[layer] = 8
    return out


def quantize_mixed_ort(
    float_onnx: Path,
    out_path: Path,
    bits: Mapping[str, int],
    nodes: Mapping[str, OnnxLinear],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = False,
) -> dict[str, int]:
    """Write ``out_path``: ``float_onnx`` with each layer at its ``bits`` (4: MatMulNBits, 8: ORT dynamic
    INT8, 32: float; ``nodes`` from ``linear_onnx_nodes``). Checks the written graph holds exactly that mix
    and returns it (layer -> bits, read back from the graph). Bad widths and layers fail before any work."""
    check_bits(bits, "the plan")
    check_block_size(block_size)
    missing = sorted(set(bits) - set(nodes))
    if missing:
        raise ConfigError(f"the plan names {missing}, which are not Linear layers found in {float_onnx}")
    gemm = sorted(layer for layer, b in bits.items() if b != FLOAT_BITS and not nodes[layer].quantizable)
    if gemm:
        raise ConfigError(
            f"the plan quantizes {gemm}, but they are Gemm nodes in the ONNX export (2-D input, such as a "
            "classifier head); MatMulNBits and ORT's dynamic INT8 rewrite MatMul only: keep them at 32 bits"
        )
    import onnx
    import onnxruntime.quantization as ortq

    with _quiet_ort():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    at4 = {nodes[layer].node for layer, b in bits.items() if b == 4}
    at8 = [nodes[layer].node for layer, b in bits.items() if b == 8]
    model = onnx.load(str(float_onnx))
    # nodes_to_include does not narrow the rewrite (it is OR-ed with the op type): exclude the others
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in at4]
    with atomic_path(Path(out_path)) as part, _quiet_ort():
        if at4:
            quantizer = MatMulNBitsQuantizer(
                model, bits=4, block_size=block_size, is_symmetric=symmetric, nodes_to_exclude=others
            )
            quantizer.process()
            model = quantizer.model.model
        onnx.save(model, str(part))
        if at8:
            ortq.quantize_dynamic(
                str(part),
                str(part),
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=at8,
                per_channel=False,
                reduce_range=False,
                weight_type=ortq.QuantType.QInt8,
            )
    written = onnx_layer_precisions(Path(out_path), nodes)
    expected = {layer: bits.get(layer, FLOAT_BITS) for layer in nodes}
    if written != expected:
        wrong = {k: (expected[k], written[k]) for k in expected if written[k] != expected[k]}
        raise CheckpointError(
            f"{out_path}: layers came out at other widths than planned (planned, got): {wrong}"
        )
    return written
