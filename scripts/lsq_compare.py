"""Accuracy of LSQ against PTQ and QAT-lite on one test split, paired against FP32 (no timing).

    PATHOLITE_ROOT=/work/runs python scripts/lsq_compare.py --fp32 <float artifact> \
        --artifact lsq_int4=<dir> --artifact int8_qat=<dir> ... [--override experiment=targets_deit_tiny] \
        --out <dir>

Every artifact (any kind ``load_artifact`` reads) runs on the same test images (the ``train`` config with
``--override``s composes the dataset; its cache is ``$PATHOLITE_ROOT/outputs/cache``). The script also makes
the 4-bit PTQ baseline from the FP32 artifact: every Linear ONNX Runtime can rewrite at 4 bits, block 32,
round to nearest with ORT's own MatMulNBits quantizer (the ptq stage's ``mixed_int4`` with an all-INT4
plan; the head, a Gemm, stays float). For each: accuracy with its bootstrap 95% interval, the difference
from FP32, paired top-1 flips against FP32 (images whose prediction changed; and of those, how many went
right -> wrong and wrong -> right). Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from patholite.accelerators.machine import describe_machine
from patholite.artifacts.load import load_artifact
from patholite.artifacts.onnx import save_onnx_artifact
from patholite.artifacts.sidecar import read_sidecar
from patholite.config.options import CONF_DIR
from patholite.data import build_datamodule
from patholite.io import write_json
from patholite.measure.evaluate import bootstrap_accuracy_ci, predict
from patholite.pipelines.stages.ptq import save_mixed_int4


class OpenVinoOnnx(torch.nn.Module):
    """An ONNX file read and compiled by OpenVINO (CPU, precision hint f32), called like a module."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(
            core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.numpy())[0].copy())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp32", required=True, help="the float artifact every row is paired against")
    parser.add_argument("--artifact", action="append", default=[], help="name=artifact folder")
    parser.add_argument("--override", action="append", default=["experiment=targets_deit_tiny"])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--openvino",
        action="append",
        default=[],
        help="an artifact name to run also through OpenVINO (f32 hint)",
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args.override)
    dm = build_datamodule(cfg.dataset)
    dm.setup("test")
    loader = dm.test_dataloader()

    fp32_net, meta = load_artifact(args.fp32)
    rows = {"fp32": args.fp32}
    int4 = out / "ptq_int4_rtn"
    if not (int4 / "artifact.json").is_file():
        work = out / "onnx_fp32"
        save_onnx_artifact(fp32_net, work, read_sidecar(args.fp32))
        save_mixed_int4(fp32_net, work / "model.onnx", int4, {**meta, "opset": 17})
    rows["ptq_int4_rtn"] = str(int4)
    rows |= dict(a.split("=", 1) for a in args.artifact)
    for name in args.openvino:
        rows[f"{name}@openvino"] = rows[name]

    results, ref, outputs = {}, None, {}
    for name, directory in rows.items():
        if name == "fp32":
            net = fp32_net
        elif name.endswith("@openvino"):
            net = OpenVinoOnnx(Path(directory) / "model.onnx")
        else:
            net = load_artifact(directory)[0]
        logits, labels = predict(net, loader, "cpu")
        pred = logits.argmax(1)
        correct = pred == labels
        row = {
            "path": directory,
            "accuracy": 100 * float(correct.float().mean()),
            "accuracy_ci95": [100 * v for v in bootstrap_accuracy_ci(correct)],
            "n": int(labels.numel()),
        }
        if ref is None:
            ref = (pred, correct, row["accuracy"])
        else:
            p0, c0, a0 = ref
            row |= {
                "delta_pp": row["accuracy"] - a0,
                "flips_vs_fp32": int((pred != p0).sum()),
                "right_to_wrong": int((c0 & ~correct).sum()),
                "wrong_to_right": int((~c0 & correct).sum()),
            }
        outputs[name] = logits
        if name.endswith("@openvino"):  # the same file on ONNX Runtime: does OpenVINO run what ORT runs?
            ort = outputs[name.removesuffix("@openvino")]
            row["flips_vs_onnxruntime"] = int((pred != ort.argmax(1)).sum())
            row["max_abs_logit_diff_vs_onnxruntime"] = float((logits - ort).abs().max())
        results[name] = row
        print(name, json.dumps(row))
    report = {"machine": describe_machine(), "override": args.override, "rows": results}
    write_json(out / "results.json", report)
    lines = [
        "| artifact | accuracy % [95% CI] | vs FP32 pp | flips vs FP32 (r->w / w->r) |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        lo, hi = r["accuracy_ci95"]
        flips = (
            f"{r['flips_vs_fp32']} ({r['right_to_wrong']} / {r['wrong_to_right']})"
            if "delta_pp" in r
            else "-"
        )
        delta = f"{r['delta_pp']:+.2f}" if "delta_pp" in r else "-"
        lines.append(f"| {name} | {r['accuracy']:.2f} [{lo:.2f}, {hi:.2f}] | {delta} | {flips} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
