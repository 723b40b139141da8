"""Entry point: ``python -m patholite.bench`` (or ``patholite-bench``): what artifacts cost on this machine.

Measures artifact directories (``artifacts=[dir,...]``), or builds a ``model=`` option with random weights
(``model.num_classes``, default 1000) and its dynamic-INT8 variant. Every artifact gets parameters, FLOPs,
size on disk and peak memory (a fresh child each); latency is timed for all of them in one child process,
alternating, with each artifact's ratio to the first per repeat (median and spread). On a GPU or NPU the
float artifacts are timed there, and INT8 and ONNX ones (CPU-only kernels) in a second child on the CPU
beside the first float one, each record naming its device (``timing_groups``). The result is a run
record (``metrics.json``), so ``patholite.compare`` and sweeps treat it like any run.
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import patholite.config  # noqa: F401  (registers the schemas)
from patholite import artifacts as art
from patholite import tracking
from patholite.accelerators.machine import bf16_unsupported_reason
from patholite.accelerators.resolve import resolve_accelerator
from patholite.artifacts.torch_autocast import save_autocast_artifact
from patholite.compress.nncf_ptq import import_nncf, import_openvino
from patholite.config.options import CONF_DIR
from patholite.config.schema import ModelConfig
from patholite.errors import ConfigError, PatholiteError
from patholite.jobs import job_info, run_hydra, sigterm_as_exit, user_message
from patholite.measure.cost import files_size
from patholite.measure.evaluate import count_architecture, measure_memory
from patholite.measure.report import print_records
from patholite.measure.timing import time_artifacts, timing_block
from patholite.models.factory import create_network
from patholite.models.fits import check_model_fits
from patholite.models.hub import locate_hub_weights, sidecar_model
from patholite.pipelines.stages import artifact_names
from patholite.pipelines.stages.ptq import (
    save_dynamic,
    save_dynamic_ort,
    save_mixed_int4,
    save_nncf,
    save_openvino_from_onnx,
    save_static_ort,
)
from patholite.records import ArtifactRecord, RunRecord, read_record

log = logging.getLogger("patholite.bench")
KIND_NAMES = {
    "torch_float": "fp32",
    "torch_int8_dynamic": "int8_dynamic",
    "onnx": "onnx_fp32",
    "openvino": "ov_fp32",
    "torch_autocast": "bf16",
}
# OpenVINO variants (the ``openvino`` extra) and the precision hint each is compiled with: FP32, bf16, and
# NNCF INT8 (transformer preset) with its float parts as the ptq stage's default makes them (``auto``: bf16
# where the CPU has it natively, else f32), or in f32 or bf16 explicitly.
OPENVINO_VARIANTS = {
    "ov_fp32": "f32",
    "ov_bf16": "bf16",
    "ov_int8_nncf": "auto",
    "ov_int8_nncf_f32": "f32",
    "ov_int8_nncf_bf16": "bf16",
}
NNCF_VARIANTS = {"ov_int8_nncf", "ov_int8_nncf_f32", "ov_int8_nncf_bf16"}
# Variants that need native bf16 in torch (autocast) or OpenVINO (precision hint), by runtime
BF16_VARIANTS = {"bf16": "torch", **{v: "openvino" for v, p in OPENVINO_VARIANTS.items() if p == "bf16"}}
VARIANTS = (
    "fp32",
    "bf16",  # the FP32 weights under torch.autocast("cpu", dtype=torch.bfloat16)
    "fp32_compile",
    "int8_dynamic",
    "onnx_fp32",
    "int8_dynamic_ort",
    "int8_static_ort",
    "int4_ort",  # every MatMul weight block-wise INT4 (MatMulNBits, block 32), the rest float
    *OPENVINO_VARIANTS,
)
ONNX_VARIANTS = {"onnx_fp32", "int8_dynamic_ort", "int8_static_ort", "int4_ort", *OPENVINO_VARIANTS}
# Where an artifact kind's model runs when the accelerator is not the CPU: torch floats move to it; torch.ao
# INT8 (dynamic, QAT) has no CUDA/NPU kernels (quantized::linear_dynamic) and ONNX artifacts run ONNX
# Runtime's CPU provider, so those stay on the CPU and are timed and recorded there.
DEVICE_KINDS = {"torch_float"}
CPU_KINDS = {"torch_int8_dynamic", "torch_int8_qat", "onnx", "openvino", "torch_autocast"}
# Random weights: static INT8 scales are fitted to random images, fine for speed, meaningless for accuracy.
CALIBRATION_IMAGES = 16


def check_variants(variants: list[str]) -> dict[str, str]:
    """Refuse unknown variants and OpenVINO ones without the extra (before any work); returns the variants
    this CPU cannot run as meant, each with why (bf16 without native bf16: skipped, not emulated)."""
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ConfigError(f"variants={list(variants)}: choose from {list(VARIANTS)}")
    openvino = sorted(set(OPENVINO_VARIANTS) & set(variants))
    if openvino:
        (import_nncf if NNCF_VARIANTS & set(variants) else import_openvino)(f"variants={openvino}")
    skipped = {}
    for v in (v for v in variants if v in BF16_VARIANTS):
        reason = bf16_unsupported_reason(BF16_VARIANTS[v])
        if reason:
            skipped[v] = reason
    if not set(variants) - set(skipped):
        raise ConfigError(f"variants={list(variants)}: nothing left to time here: {skipped}")
    return skipped


def build_random_artifacts(
    cfg: DictConfig, out: Path, engine: str, variants: list[str] | None = None
) -> list[Path]:
    """The ``model=`` option with seeded random weights, saved as the requested variants (``variants``:
    these of ``cfg.variants``; the same INT8 paths the ptq stage takes; static INT8 and NNCF calibrated on
    random images)."""
    variants = list(cfg.variants if variants is None else variants)
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ConfigError(f"variants={variants}: choose from {list(VARIANTS)}")
    n = cfg.model.num_classes or 1000
    locate_hub_weights(cfg.model)  # a hub model's architecture is in its config (fetched: model.download)
    # random weights of the architecture, written out: the artifacts load without the hub cache
    model, _ = sidecar_model(OmegaConf.to_container(cfg.model, resolve=True))
    architecture = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    check_model_fits(architecture, n, cfg.image_size)
    torch.manual_seed(cfg.seed)
    net = create_network(architecture, n, cfg.image_size).eval()
    meta = {
        "model": {**model, "checkpoint": None},
        "class_names": [f"class_{i}" for i in range(n)],
        "image_size": cfg.image_size,
        "random_weights": True,
    }
    dirs = []
    if "fp32" in variants:
        art.save_float_artifact(net, out / "fp32", meta)
        dirs.append(out / "fp32")
    if "fp32_compile" in variants:  # compiled on load in the timing child; warm-up absorbs compilation
        art.save_float_artifact(net, out / "fp32_compile", {**meta, "runtime": "torch_compile"})
        dirs.append(out / "fp32_compile")
    if "bf16" in variants:  # same weights as fp32, run under CPU bf16 autocast
        save_autocast_artifact(net, out / "bf16", meta, "bfloat16")
        dirs.append(out / "bf16")
    if "int8_dynamic" in variants:
        save_dynamic(net, out / "int8_dynamic", meta, engine)
        dirs.append(out / "int8_dynamic")
    if ONNX_VARIANTS & set(variants):
        onnx_dir = out / "onnx_fp32"
        art.save_onnx_artifact(net, onnx_dir, meta)
        float_onnx = onnx_dir / art.ONNX_FILE
        if "onnx_fp32" in variants:
            dirs.append(onnx_dir)
        if "int8_dynamic_ort" in variants:
            save_dynamic_ort(float_onnx, out / "int8_dynamic_ort", meta)
            dirs.append(out / "int8_dynamic_ort")
        if "int8_static_ort" in variants:
            g = torch.Generator().manual_seed(cfg.seed)
            batches = [torch.randn(CALIBRATION_IMAGES, 3, cfg.image_size, cfg.image_size, generator=g)]
            how = {"format": "QDQ", "calibration": f"{CALIBRATION_IMAGES} random images (speed only)"}
            save_static_ort(float_onnx, out / "int8_static_ort", meta, batches, how)
            dirs.append(out / "int8_static_ort")
        for name, precision in OPENVINO_VARIANTS.items():
            if name not in variants:
                continue
            if name in NNCF_VARIANTS:
                g = torch.Generator().manual_seed(cfg.seed)
                batches = [torch.randn(CALIBRATION_IMAGES, 3, cfg.image_size, cfg.image_size, generator=g)]
                how = {"calibration": f"{CALIBRATION_IMAGES} random images (speed only)"}
                save_nncf(float_onnx, out / name, meta, batches, precision, how)
            else:
                save_openvino_from_onnx(float_onnx, out / name, meta, precision)
            dirs.append(out / name)
        if "int4_ort" in cfg.variants:
            save_mixed_int4(net, float_onnx, out / "int4_ort", meta)
            dirs.append(out / "int4_ort")
    return dirs


def artifact_name(directory: Path, meta: dict[str, Any]) -> str:
    """A benchmarked artifact's record name: its folder's, when that is an artifact name (a run's artifact
    folders, the variants), else by its kind."""
    known = {*artifact_names(), *VARIANTS}
    if directory.name in known:
        return directory.name
    if meta["kind"] == "openvino":  # one kind, several variants: by its quantization and precision
        name = "ov_int8_nncf" if meta.get("quantization") else "ov_fp32"
        if meta.get("precision_requested") == "auto":  # as the ptq stage's default made it
            return name
        if meta.get("precision") == "bf16":
            name = "ov_bf16" if name == "ov_fp32" else f"{name}_bf16"
        return name
    return KIND_NAMES.get(meta["kind"], "fp32")


@dataclass(frozen=True)
class TimingGroup:
    """Artifacts timed together in one child on ``device``, alternating, the first as the baseline; only
    the ``measured`` ones take their numbers from it (the baseline may be there for the ratios alone)."""

    device: str
    directories: list[Path]
    measured: list[Path]
    note: str | None = None


def timing_groups(
    directories: list[Path], names: list[str], kinds: list[str], device: str
) -> list[TimingGroup]:
    """Where each artifact is timed. On the CPU: all together. On an accelerator, the float artifacts
    there, and every other kind (``CPU_KINDS``: torch.ao INT8 has no CUDA/NPU kernels, ONNX Runtime runs
    its CPU provider) on the CPU, alternating with the first float artifact timed there too as their
    baseline, so each record's device is the one its model really ran on."""
    unknown = sorted({k for k in kinds if k not in DEVICE_KINDS and k not in CPU_KINDS})
    if unknown:  # a new kind must say where it runs before its numbers can be trusted
        raise PatholiteError(f"bench: artifact kinds {unknown} have no timing device; add them to bench.py")
    if torch.device(device).type == "cpu":
        return [TimingGroup(device, list(directories), list(directories))]
    floats = [d for d, k in zip(directories, kinds, strict=True) if k in DEVICE_KINDS]
    cpu = [d for d, k in zip(directories, kinds, strict=True) if k in CPU_KINDS]
    groups = [TimingGroup(device, floats, floats)] if floats else []
    if cpu:
        name = dict(zip(directories, names, strict=True))
        baseline = (
            f", alternating with {name[floats[0]]} timed on the CPU too as their baseline" if floats else ""
        )
        note = (
            f"{sorted({name[d] for d in cpu})} run on the CPU only (torch.ao INT8 has no "
            f"{torch.device(device).type} kernels, ONNX Runtime and OpenVINO run on the CPU): timed on the "
            f"CPU{baseline}" + (f"; the float artifacts ran on {device}" if floats else "")
        )
        groups.append(TimingGroup("cpu", floats[:1] + cpu, cpu, note))
    return groups


def _static_cost(directory: Path, image_size: int) -> dict[str, Any]:
    net, meta = art.load_artifact(directory)
    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    cost: dict[str, Any] = {"size_bytes": files_size(directory, files)}
    cost.update(count_architecture(net, image_size, directory=directory))
    if meta["kind"] != "torch_float":
        cost["count_note"] = "params and FLOPs of the float architecture"
    return {"files": files, "meta": meta, "cost": cost}


def _tracking(cfg: DictConfig, out: Path, job: dict[str, Any], choices: dict[str, Any]) -> list:
    """The bench job's W&B run (``job_type=bench``), named by what it times."""
    what = cfg.model.name if not cfg.artifacts else "-".join(Path(d).name for d in cfg.artifacts)
    name = f"bench-{what}" + (f"-{job['num']}" if job["num"] is not None else "")
    group = tracking.job_group(cfg, job, out, choices)
    return tracking.build_loggers(cfg, out, group, name, None, job_type="bench", csv=False)


def run_bench(cfg: DictConfig) -> str:
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir).resolve()
    job = job_info(hc)
    config = OmegaConf.to_container(cfg, resolve=True)
    record = RunRecord(run_dir=str(out), config=config, job=job, entry="bench")
    record.config.setdefault("compression", {"name": "bench"})
    loggers: list = []
    try:
        record.write()
        loggers = _tracking(cfg, out, job, hc.runtime.choices)
        record.wandb = tracking.wandb_info(loggers, cfg.logger.wandb.mode if cfg.logger.wandb else "disabled")
        accel = resolve_accelerator(cfg.accelerator)
        record.device = accel.describe()
        skipped = {} if cfg.artifacts else check_variants(list(cfg.variants))
        for variant, reason in skipped.items():  # in the record, not emulated silently
            log.warning("variant %s skipped: %s", variant, reason)
            record.device.setdefault("notes", []).append(f"variant {variant} skipped: {reason}")
        wanted = [v for v in cfg.variants if v not in skipped]
        dirs = [Path(d).expanduser().resolve() for d in cfg.artifacts] or build_random_artifacts(
            cfg, out / "artifacts", accel.int8_engine, wanted
        )
        static = [_static_cost(d, cfg.image_size) for d in dirs]  # also checks every artifact loads
        names = [artifact_name(d, s["meta"]) for d, s in zip(dirs, static, strict=True)]
        groups = timing_groups(dirs, names, [s["meta"]["kind"] for s in static], str(accel.device))
        timed = {}  # directory -> (its group, the group's timing result)
        for group in groups:
            result = time_artifacts(group.directories, cfg.image_size, cfg.bench, group.device)
            timed.update({d: (group, result) for d in group.measured})
        for d, s, name in zip(dirs, static, names, strict=True):
            group, timing = timed[d]
            t = timing["artifacts"][d.name]
            cost = {
                **s["cost"],
                **measure_memory(d, cfg.image_size, cfg.bench, group.device),
                "latency_ms": t["latency_ms"],
                "throughput_ips": t["throughput_ips"],
                "device": timing["device"],
                "threads": timing["threads"],
                "timing": {
                    **timing_block(timing, d, [names[dirs.index(g)] for g in group.directories]),
                    **({"note": group.note} if group.note else {}),
                },
                "protocol": {k: cfg.bench[k] for k in ("warmup", "iters", "repeats")},
            }
            record.artifacts.append(
                ArtifactRecord(
                    name=name,
                    path=str(d),
                    files=s["files"],
                    quality={},
                    cost=cost,
                    source=None if name == "fp32" else "fp32",
                    model=(s["meta"].get("model") or {}).get("name"),
                )
            )
        record.finish("ok")
        tracking.log_record(loggers, record, log_model=cfg.logger.log_model)
    except (KeyboardInterrupt, SystemExit) as err:
        record.finish("interrupted", err, traceback.format_exc())
        raise
    except Exception as err:
        record.finish("failed", err, traceback.format_exc())
        if job["multirun"]:
            log.error("bench job failed (%s: %s); the sweep goes on", type(err).__name__, err)
            return record.status
        if isinstance(err, PatholiteError):
            print(
                f"patholite: {type(err).__name__}: {user_message(err)}\nrecord: {record.path}",
                file=sys.stderr,
            )
            raise SystemExit(1) from err
        raise
    finally:
        tracking.close_loggers(loggers, record.status)
    if not job["multirun"]:
        print_records([read_record(record.path)], title=f"bench {out}")
        for a in record.artifacts:
            ratios = ", ".join(
                f"b{b}: {r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"
                for b, r in a.cost["timing"]["ratio_to_baseline"].items()
            )
            where = f"{a.cost['timing']['baseline']} on {a.cost['device']}"
            print(f"{a.name}: latency / {where} = {ratios}")
        print(f"record: {record.path}")
    return record.status


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def _hydra_main(cfg: DictConfig) -> str:
    with sigterm_as_exit():
        return run_bench(cfg)


def main() -> None:
    run_hydra(_hydra_main)


if __name__ == "__main__":
    main()
