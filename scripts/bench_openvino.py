"""OpenVINO and NNCF against torch and ONNX Runtime on one model, timed in ONE process, alternating (issue
18's P1 speed target), with the CPU's features in the result.

    python scripts/bench_openvino.py --out <dir> [--model deit_tiny_patch16_224 --classes 7 --size 224 \
        --threads 2 --batches 1 8 --repeats 5 --iters 20]

Variants, all from the same random-weight network (speed only) and its one ONNX export:
- ``torch_fp32``: torch eager (the baseline of every ratio);
- ``ort_int8_dynamic``: patholite's ONNX Runtime dynamic INT8 artifact;
- ``ov_fp32``, ``ov_bf16``: patholite's OpenVINO artifacts, precision hint f32 / bf16 (bf16 skipped, with
  the reason, on a CPU without native bf16);
- ``ov_int8_nncf``, ``ov_int8_nncf_bf16``: patholite's NNCF INT8 artifact (transformer preset, calibrated on
  ``--calibration`` random images), float parts in f32 / bf16;
- ``openvino_api_int8``: the same ONNX quantized by NNCF and run through OpenVINO's own API as its
  documentation does it (``core.compile_model(model, "CPU")`` with OpenVINO's defaults, ``compiled(x)``):
  what a practitioner gets; the issue's target is patholite's INT8 within 5% of it.

Each repeat times every variant at every batch size in turn (the order reversed on odd repeats); the
throughput ratio to ``torch_fp32`` is taken per repeat and reported as its median [min-max]. Writes
``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from patholite.artifacts.load import load_artifact
from patholite.artifacts.onnx import ONNX_FILE, save_onnx_artifact
from patholite.artifacts.openvino import bf16_unsupported_reason, cpu_flags, save_openvino_from_onnx
from patholite.compress.nncf_ptq import import_nncf
from patholite.pipelines.stages.ptq import save_dynamic_ort, save_nncf

FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="a timm architecture")
    parser.add_argument("--classes", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--iters", type=int, default=20, help="timed calls per block at batch 1 (fewer at larger)"
    )
    parser.add_argument("--calibration", type=int, default=16, help="NNCF calibration images (random)")
    return parser.parse_args(argv)


def cpu_description() -> dict:
    """The CPU's model string, the features that decide INT8 and bf16 speed, and its logical CPUs."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = cpu_flags()
    return {
        "model": names[0] if names else platform.processor(),
        "features": [f for f in FEATURES if f in flags],
        "logical_cpus": sum(line.startswith("processor") for line in lines),
    }


def build(args: argparse.Namespace, work: Path) -> tuple[dict[str, Callable], dict[str, str], dict]:
    """Every variant as a callable on a float32 batch tensor, the variants skipped (with why), and sizes."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model(args.model, pretrained=False, num_classes=args.classes, img_size=args.size).eval()
    meta = {"image_size": args.size, "class_names": [f"c{i}" for i in range(args.classes)], "random": True}
    save_onnx_artifact(net, work / "onnx_fp32", meta)
    onnx_file = work / "onnx_fp32" / ONNX_FILE
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(args.calibration, 3, args.size, args.size, generator=g)]
    save_dynamic_ort(onnx_file, work / "ort_int8_dynamic", meta)
    skipped: dict[str, str] = {}
    bf16 = bf16_unsupported_reason()
    for name, precision in (("ov_fp32", "f32"), ("ov_bf16", "bf16")):
        if precision == "bf16" and bf16:
            skipped[name] = bf16
            continue
        save_openvino_from_onnx(onnx_file, work / name, meta, precision)
    for name, precision in (("ov_int8_nncf", "f32"), ("ov_int8_nncf_bf16", "bf16")):
        if precision == "bf16" and bf16:
            skipped[name] = bf16
            continue
        save_nncf(onnx_file, work / name, meta, calibration, precision)

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x)

    variants: dict[str, Callable] = {"torch_fp32": eager}
    sizes = {}
    for name in ("ort_int8_dynamic", "ov_fp32", "ov_bf16", "ov_int8_nncf", "ov_int8_nncf_bf16"):
        if name in skipped:
            continue
        module, _ = load_artifact(work / name)
        variants[name] = module
        sizes[name] = sum(p.stat().st_size for p in (work / name).iterdir() if p.name != "artifact.json")
    # OpenVINO's own API on the same ONNX: NNCF's quantize on the converted model, OpenVINO's defaults
    nncf = import_nncf("the OpenVINO API variant")
    import openvino as ov

    items = [image[None].numpy() for image in calibration[0]]
    quantized = nncf.quantize(
        ov.convert_model(str(onnx_file)),
        nncf.Dataset(items),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(items),
    )
    compiled = ov.Core().compile_model(quantized, "CPU")
    variants["openvino_api_int8"] = lambda x: compiled(x.numpy())[0]
    defaults = {
        k: str(compiled.get_property(k)) for k in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS")
    }
    sizes["onnx_fp32"] = onnx_file.stat().st_size
    return variants, skipped, {"sizes_bytes": sizes, "openvino_api_defaults": defaults}


def time_block(fn: Callable, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median latency (ms) of ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)  # the OpenVINO and ORT artifacts take torch's thread count
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    variants, skipped, info = build(args, args.out / "artifacts")
    print(f"built {list(variants)} in {time.time() - started:.0f} s; skipped {skipped}", flush=True)
    names = list(variants)
    lat = {n: {b: [] for b in args.batches} for n in names}
    for repeat in range(args.repeats):
        for b in args.batches:
            x = torch.randn(b, 3, args.size, args.size)
            iters = max(5, args.iters // b * 2) if b > 1 else args.iters
            for n in names[:: -1 if repeat % 2 else 1]:
                lat[n][b].append(time_block(variants[n], x, warmup=3, iters=iters))
        print(f"repeat {repeat + 1}/{args.repeats} done at {time.time() - started:.0f} s", flush=True)
    result = {
        "cpu": cpu_description(),
        "threads": args.threads,
        "model": args.model,
        "classes": args.classes,
        "image_size": args.size,
        "versions": {"torch": torch.__version__, **_versions()},
        "protocol": {
            "repeats": args.repeats,
            "iters_b1": args.iters,
            "alternating": True,
            "one_process": True,
        },
        "skipped": skipped,
        **info,
        "variants": {},
    }
    for n in names:
        entry = {}
        for b in args.batches:
            ratios = [t / v for t, v in zip(lat["torch_fp32"][b], lat[n][b], strict=True)]  # throughput
            entry[str(b)] = {
                "latency_ms_median": round(statistics.median(lat[n][b]), 2),
                "throughput_ratio": round(statistics.median(ratios), 3),
                "throughput_ratio_min": round(min(ratios), 3),
                "throughput_ratio_max": round(max(ratios), 3),
            }
        result["variants"][n] = entry
    for name in ("ov_int8_nncf", "ov_int8_nncf_bf16"):  # patholite's INT8 / OpenVINO's API, per repeat
        if name in lat:
            api = lat["openvino_api_int8"]
            result.setdefault("against_openvino_api", {})[name] = {
                str(b): round(
                    statistics.median([a / p for a, p in zip(api[b], lat[name][b], strict=True)]), 3
                )
                for b in args.batches
            }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result, args.batches))
    print(markdown(result, args.batches))


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("openvino", "nncf", "onnxruntime", "timm")}


def markdown(result: dict, batches: list[int]) -> str:
    cpu = result["cpu"]
    head = (
        f"{result['model']}, {result['classes']} classes, {result['image_size']} px, "
        f"{result['threads']} threads; CPU: {cpu['model']} ({', '.join(cpu['features'])}); one process, "
        f"alternating, {result['protocol']['repeats']} repeats. Throughput / torch FP32, median [min-max]."
    )
    lines = [
        head,
        "",
        "| variant | " + " | ".join(f"b{b} ms | b{b} x torch" for b in batches) + " | size MB |",
        "| --- | " + " | ".join("--- | ---" for _ in batches) + " | --- |",
    ]
    for n, entry in result["variants"].items():
        cells = []
        for b in batches:
            e = entry[str(b)]
            spread = f"[{e['throughput_ratio_min']:.2f}-{e['throughput_ratio_max']:.2f}]"
            cells.append(f"{e['latency_ms_median']} | {e['throughput_ratio']:.2f}x {spread}")
        size = result["sizes_bytes"].get(n)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {f'{size / 1e6:.2f}' if size else ''} |")
    for n, reason in result["skipped"].items():
        lines.append(f"| {n} | skipped: {reason} |")
    defaults = result["openvino_api_defaults"]
    for n, by_batch in result.get("against_openvino_api", {}).items():
        ratios = ", ".join(f"b{b} {r}" for b, r in by_batch.items())
        lines += ["", f"{n} throughput / openvino_api_int8 (OpenVINO's defaults {defaults}): {ratios}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
