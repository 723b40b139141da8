"""LSQ: quantization-aware training with learned step sizes (Esser et al. 2020, R5), and its QDQ ONNX export.

A quantizer maps ``v`` to ``v_hat = round(clamp(v / s, -Qn, Qp)) * s`` with a learnable step ``s``. The
rounding passes gradients straight through inside the clip range (zero outside), and ``s`` gets the paper's
gradient ``d v_hat / d s`` (``round(v/s) - v/s`` inside, ``-Qn`` below, ``Qp`` above) scaled by
``g = 1 / sqrt(N * Qp)``, ``N`` the elements one step serves (a weight channel or block; an activation's
features per sample, the paper's N_F). Steps start at ``2 * mean(|v|) / sqrt(Qp)``.

What is quantized, and why:
- every ``nn.Linear`` of the network (attention qkv/proj, MLP fc1/fc2, the head): its weights, and its input
  activations (per tensor, 8 bits), exactly what a QDQ graph around MatMul/Gemm expresses;
- weights per output channel at 8 bits (narrow range [-127, 127]: no u8s8 overflow on CPUs without VNNI),
  per block of ``block_size`` input elements at 4 bits (full range [-8, 7], the blocks of ONNX Runtime's
  4-bit MatMulNBits, ``compress/int4.py``); the head stays at 8 bits per channel whatever ``weight_bits``
  (the paper keeps first and last layers at 8 bits; it is 0.1% of DeiT-Tiny's weights);
- activations signed, except the input of an MLP's second Linear after GELU, which is unsigned (GELU's
  negative tail, at least -0.17, clips to 0: the paper's choice after ReLU buys a bit of resolution);
- the patch embedding (a Conv2d on the raw image, 3% of DeiT-Tiny's weights) stays float, as in the 4-bit
  runtime path; LayerNorm, softmax, GELU, the attention products and residual adds stay float.

Step parameters are stored flat (1-D) so the optimizer's "no weight decay for 1-D parameters" rule keeps
weight decay from pulling them to zero; they train with the network's optimizer and learning rate.

``export_lsq_qdq`` rewrites a float ONNX export of the same network: each quantized Linear's weight becomes
an INT8 (per-channel) or INT4 (blocked, opset 21) initializer behind ``DequantizeLinear`` with the learned
steps as scales, and its input gets ``QuantizeLinear -> DequantizeLinear`` with the learned activation step.
ONNX Runtime fuses the 4-bit form into MatMulNBits itself, so no second MatMulNBits writer is needed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from patholite.compress.int4 import OnnxLinear, check_block_size
from patholite.errors import CheckpointError, ConfigError
from patholite.io import atomic_path

WEIGHT_BITS = (4, 8)
ACT_BITS = (8, 32)  # 32: activations stay float (weight-only quantization)
FLOAT_BITS = 32
MIN_STEP = 1e-8  # a step never reaches 0 (a zero block, a step driven negative): v / s stays finite


def check_lsq_bits(weight_bits: Any, act_bits: Any) -> None:
    """One clear error for bit widths the exported runtime cannot run."""
    if isinstance(weight_bits, bool) or weight_bits not in WEIGHT_BITS:
        raise ConfigError(
            f"compression.qat.weight_bits={weight_bits!r}: LSQ exports 4-bit (blocked INT4) or 8-bit "
            "(per-channel INT8) weights; use 4 or 8"
        )
    if isinstance(act_bits, bool) or act_bits not in ACT_BITS:
        raise ConfigError(
            f"compression.qat.act_bits={act_bits!r}: LSQ quantizes activations to 8 bits, or keeps them "
            "float with 32; use 8 or 32"
        )


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """(Qn, Qp): the grid is the integers in [-Qn, Qp]."""
    if not signed:
        return 0, 2**bits - 1
    return (2 ** (bits - 1) - (1 if narrow else 0)), 2 ** (bits - 1) - 1


class _LsqRound(torch.autograd.Function):
    """round(clamp(v / s, -Qn, Qp)) * s with LSQ's gradients; ``s`` broadcasts against ``v``."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
        x = v / s
        q = torch.clamp(x, -qn, qp).round()
        ctx.save_for_backward(x, q, s)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return q * s

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, q, s = ctx.saved_tensors
        inside = (x >= -ctx.qn) & (x <= ctx.qp)
        grad_v = grad * inside
        # d v_hat / d s: round(x) - x inside the range, the clip bound outside (q is that bound there)
        dvds = torch.where(inside, q - x, q)
        grad_s = (grad * dvds * ctx.g).sum_to_size(s.shape)
        return grad_v, grad_s, None, None, None


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """The LSQ fake quantization of ``v`` with steps ``s`` (broadcasting), gradient scale ``g``."""
    return _LsqRound.apply(v, s, qn, qp, g)


class LsqQuantizer(nn.Module):
    """A learned-step quantizer. ``groups`` steps (1: per tensor), stored flat; ``view(v)`` reshapes ``v``
    so that the steps broadcast (the caller's business). ``per_step`` is N of the gradient scale."""

    def __init__(self, bits: int, signed: bool, groups: int = 1, narrow: bool = False) -> None:
        super().__init__()
        self.bits, self.signed, self.narrow = int(bits), bool(signed), bool(narrow)
        self.qn, self.qp = qrange(self.bits, self.signed, self.narrow)
        self.step = nn.Parameter(torch.ones(groups))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def init_from(self, mean_abs: torch.Tensor) -> None:
        """The paper's start: s = 2 mean(|v|) / sqrt(Qp) (``mean_abs``: one per step)."""
        self.step.copy_((2 * mean_abs.reshape(-1) / math.sqrt(self.qp)).clamp_min(MIN_STEP))
        self.initialised.fill_(True)

    def effective_step(self) -> torch.Tensor:
        return self.step.clamp_min(MIN_STEP)

    def quantize(self, v: torch.Tensor, step_shape: tuple[int, ...], per_step: int) -> torch.Tensor:
        g = 1.0 / math.sqrt(per_step * self.qp)
        return lsq_quantize(v, self.effective_step().reshape(step_shape), self.qn, self.qp, g)

    def extra_repr(self) -> str:
        steps = self.step.numel()
        return f"bits={self.bits}, signed={self.signed}, steps={steps}, range=[-{self.qn}, {self.qp}]"


def _blocks(in_features: int, block_size: int) -> int:
    return -(-in_features // block_size)


class LsqLinear(nn.Module):
    """An ``nn.Linear`` (kept as ``linear``: its weight and bias) with LSQ weight and input quantizers.

    ``block_size`` None: one weight step per output channel; else one per block of ``block_size`` input
    elements (the last block zero-padded when ``in_features`` is not a multiple). ``act_bits`` 32: the
    input stays float."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_bits: int,
        act_bits: int,
        block_size: int | None = None,
        act_signed: bool = True,
    ) -> None:
        super().__init__()
        self.linear = linear
        self.block_size = block_size
        out, inp = linear.weight.shape
        groups = out * (_blocks(inp, block_size) if block_size else 1)
        # 4-bit uses the full signed range; 8-bit the narrow one (see the module docstring)
        self.wq = LsqQuantizer(weight_bits, signed=True, groups=groups, narrow=weight_bits == 8)
        self.aq = LsqQuantizer(act_bits, signed=act_signed) if act_bits != FLOAT_BITS else None
        self.init_weight_step()

    def _weight_view(self) -> torch.Tensor:
        """The weight as (out, groups per row, elements per group), zero-padded to whole blocks."""
        w = self.linear.weight
        if not self.block_size:
            return w.unsqueeze(1)
        out, inp = w.shape
        pad = _blocks(inp, self.block_size) * self.block_size - inp
        if pad:
            w = F.pad(w, (0, pad))
        return w.reshape(out, -1, self.block_size)

    @torch.no_grad()
    def init_weight_step(self) -> None:
        self.wq.init_from(self._weight_view().abs().mean(dim=-1))

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (out x in), what the exported DequantizeLinear computes."""
        view = self._weight_view()
        wq = self.wq.quantize(view, (view.shape[0], view.shape[1], 1), view.shape[-1])
        return wq.reshape(view.shape[0], -1)[:, : self.linear.in_features]

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is None:
            return x
        if not bool(self.aq.initialised):
            raise ConfigError("an LSQ activation step was never calibrated: run calibrate_lsq first")
        return self.aq.quantize(x, (1,), max(1, x[0].numel()) if x.dim() > 1 else x.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.linear.bias)


def _after_gelu(net: nn.Module) -> set[str]:
    """Qualified names of Linear layers whose input is a GELU's output (timm Mlp: fc1 -> act -> fc2)."""
    out = set()
    for name, m in net.named_modules():
        fc2, act = getattr(m, "fc2", None), getattr(m, "act", None)
        norm, drop = getattr(m, "norm", nn.Identity()), getattr(m, "drop1", nn.Identity())
        plain = isinstance(norm, nn.Identity) and isinstance(drop, nn.Dropout | nn.Identity)
        if isinstance(fc2, nn.Linear) and isinstance(act, nn.GELU) and plain:
            out.add(f"{name}.fc2" if name else "fc2")
    return out


def head_names(net: nn.Module) -> set[str]:
    """The classifier head's Linear layers (timm's ``get_classifier``), kept at 8 bits per channel."""
    get = getattr(net, "get_classifier", None)
    head = get() if callable(get) else None
    return {n for n, m in net.named_modules() if m is head and isinstance(m, nn.Linear)}


def prepare_lsq(net: nn.Module, weight_bits: int = 8, act_bits: int = 8, block_size: int = 32) -> nn.Module:
    """A trainable copy of ``net`` whose Linear layers are ``LsqLinear`` (``net`` is left untouched);
    activation steps still need ``calibrate_lsq``. Bad widths or block sizes fail before any copy."""
    check_lsq_bits(weight_bits, act_bits)
    if weight_bits == 4:
        check_block_size(block_size)
    lsq = copy.deepcopy(net).train()
    unsigned, heads = _after_gelu(lsq), head_names(lsq)
    linears = [(n, m) for n, m in lsq.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise ConfigError(f"LSQ quantizes Linear layers; {type(net).__name__} has none")
    for name, linear in linears:
        bits = 8 if name in heads else weight_bits
        wrapped = LsqLinear(
            linear, bits, act_bits, block_size if bits == 4 else None, act_signed=name not in unsigned
        )
        parent, _, attr = name.rpartition(".")
        setattr(lsq.get_submodule(parent) if parent else lsq, attr, wrapped)
    lsq.patholite_lsq = {"weight_bits": weight_bits, "act_bits": act_bits, "block_size": block_size}
    return lsq


def lsq_layers(net: nn.Module) -> dict[str, LsqLinear]:
    """Every ``LsqLinear`` of a prepared network by the qualified name of the Linear it wraps."""
    return {name: m for name, m in net.named_modules() if isinstance(m, LsqLinear)}


@torch.no_grad()
def calibrate_lsq(net: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Initialise every activation step from ``batches`` (images): s = 2 mean(|x|) / sqrt(Qp) with the mean
    over all of them, taken with float inputs (no activation quantized yet). Returns the images seen."""
    layers = [m for m in lsq_layers(net).values() if m.aq is not None]
    sums = {id(m): [0.0, 0] for m in layers}  # per layer: sum of |x|, element count

    def observe(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        stats = sums[id(module)]
        stats[0] += float(args[0].detach().abs().sum())
        stats[1] += args[0].numel()

    hooks = [m.register_forward_pre_hook(observe) for m in layers]
    saved = {id(m): m.aq for m in layers}
    for m in layers:  # float inputs while the statistics are taken
        m.aq = None
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    seen = 0
    try:
        for images in batches:
            net(images.to(device))
            seen += len(images)
    finally:
        for hook in hooks:
            hook.remove()
        for m in layers:
            m.aq = saved[id(m)]
        net.train(was_training)
    if seen == 0:
        raise ConfigError("LSQ calibration got no images: activation steps need calibration batches")
    for m in layers:
        total, count = sums[id(m)]
        m.aq.init_from(torch.tensor([total / max(1, count)]))
    return seen


@torch.no_grad()
def float_weights(lsq_net: nn.Module) -> nn.Module:
    """A plain copy of a prepared network: each ``LsqLinear`` back to its Linear with its (float, trained)
    weight. Its ONNX export is what ``export_lsq_qdq`` rewrites; it finds the layers by these weights."""
    plain = copy.deepcopy(lsq_net).cpu().eval()
    for name, m in list(lsq_layers(plain).items()):
        parent, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(parent) if parent else plain, attr, m.linear)
    if hasattr(plain, "patholite_lsq"):
        del plain.patholite_lsq
    return plain


# ----------------------------------------------------------------------------------------- ONNX
def _weight_qdq(layer: LsqLinear, node: OnnxLinear, transposed: bool) -> dict[str, Any]:
    """The integer weight, its scales and DequantizeLinear's attributes for one layer, in the layout of the
    ONNX node's B input (MatMul, Gemm transB=0: in x out; Gemm transB=1: out x in)."""
    w = layer.linear.weight.detach().float().cpu()
    out, inp = w.shape
    step = layer.wq.effective_step().detach().float().cpu()
    bits = layer.wq.bits
    if layer.block_size:
        bs = layer.block_size
        nb = _blocks(inp, bs)
        s = step.reshape(out, nb)
        full = s.repeat_interleave(bs, dim=1)[:, :inp]
        q = torch.clamp(w / full, -layer.wq.qn, layer.wq.qp).round()
        if transposed:  # B is out x in, blocks along axis 1
            return {"q": q, "scale": s, "axis": 1, "block_size": bs, "bits": bits}
        return {"q": q.T, "scale": s.T, "axis": 0, "block_size": bs, "bits": bits}
    s = step.reshape(out)
    q = torch.clamp(w / s[:, None], -layer.wq.qn, layer.wq.qp).round()
    if transposed:
        return {"q": q, "scale": s, "axis": 0, "block_size": None, "bits": bits}
    return {"q": q.T, "scale": s, "axis": 1, "block_size": None, "bits": bits}


def export_lsq_qdq(
    lsq_net: nn.Module, float_onnx: Path, out_path: Path, nodes: Mapping[str, OnnxLinear]
) -> dict[str, Any]:
    """Write ``out_path``: ``float_onnx`` (exported from ``float_weights(lsq_net)``) with every LSQ layer in
    QDQ form and the learned steps as scales (opset 21, for INT4 and blocked scales). ``nodes``:
    ``int4.linear_onnx_nodes`` of that export. Returns the plan written (layer -> weight and input bits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    layers = lsq_layers(lsq_net)
    missing = sorted(set(layers) - set(nodes))
    if missing:
        raise CheckpointError(f"{float_onnx}: LSQ layers {missing} were not found in the float export")
    model = onnx.load(str(float_onnx))
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    new_nodes: dict[str, list[Any]] = {}  # float node name -> nodes to insert before it
    plan: dict[str, dict[str, Any]] = {}
    for name, layer in layers.items():
        where = nodes[name]
        node = by_name[where.node]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        transposed = where.op_type == "Gemm" and bool(attrs.get("transB", 0))
        qw = _weight_qdq(layer, where, transposed)
        wname = node.input[1]
        if wname not in inits:
            raise CheckpointError(f"{float_onnx}: {name}'s weight {wname} is not an initializer")
        graph.initializer.remove(inits[wname])
        int_type = TensorProto.INT4 if qw["bits"] == 4 else TensorProto.INT8
        q = qw["q"].numpy().astype(np.int8)
        s_init = numpy_helper.from_array(qw["scale"].numpy().astype(np.float32), f"{wname}_scale")
        z = np.zeros(qw["scale"].shape, dtype=np.int8)
        if qw["bits"] == 4:  # packed two to a byte by make_tensor
            q_init = helper.make_tensor(f"{wname}_q", int_type, q.shape, q.flatten().tolist())
            z_init = helper.make_tensor(f"{wname}_zero", int_type, z.shape, z.flatten().tolist())
        else:  # raw bytes: make_tensor's int32_data spends up to 10 bytes on a negative int8
            q_init = numpy_helper.from_array(q, f"{wname}_q")
            z_init = numpy_helper.from_array(z, f"{wname}_zero")
        graph.initializer.extend([q_init, s_init, z_init])
        dq_kwargs: dict[str, Any] = {"axis": qw["axis"]}
        if qw["block_size"]:
            dq_kwargs["block_size"] = qw["block_size"]
        inserted = [
            helper.make_node(
                "DequantizeLinear",
                [q_init.name, s_init.name, z_init.name],
                [wname],
                name=f"{node.name}_weight_dq",
                **dq_kwargs,
            )
        ]
        if layer.aq is not None:
            a = layer.aq
            x = node.input[0]
            a_type = TensorProto.INT8 if a.signed else TensorProto.UINT8
            a_scale = numpy_helper.from_array(
                np.array(a.effective_step().detach().float().cpu().item(), dtype=np.float32),
                f"{node.name}_x_scale",
            )
            a_zero = helper.make_tensor(f"{node.name}_x_zero", a_type, [], [0])
            graph.initializer.extend([a_scale, a_zero])
            inserted += [
                helper.make_node(
                    "QuantizeLinear",
                    [x, a_scale.name, a_zero.name],
                    [f"{node.name}_x_q"],
                    name=f"{node.name}_x_quantize",
                ),
                helper.make_node(
                    "DequantizeLinear",
                    [f"{node.name}_x_q", a_scale.name, a_zero.name],
                    [f"{node.name}_x_dq"],
                    name=f"{node.name}_x_dequantize",
                ),
            ]
            node.input[0] = f"{node.name}_x_dq"
        new_nodes[node.name] = inserted
        plan[name] = {
            "weight_bits": layer.wq.bits,
            "weight_scales": "per_block" if layer.block_size else "per_channel",
            "input_bits": a.bits if layer.aq is not None else FLOAT_BITS,
            "input_signed": bool(a.signed) if layer.aq is not None else None,
        }
    ordered = []
    for node in graph.node:
        ordered += new_nodes.get(node.name, [])
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    # INT4 and blocked DequantizeLinear are opset 21; every other op of a ViT export keeps its meaning
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    model.ir_version = max(model.ir_version, 10)
    onnx.checker.check_model(model)
    with atomic_path(Path(out_path)) as part:
        onnx.save(model, str(part))
    return plan
