"""Encoders (a run whose first stage makes an encoder: ``feature_kd``), judged as the field judges them
(kaiko's eva): the labelled splits of ``dataset=`` are embedded once per artifact, a linear probe and kNN
are fitted on the train embeddings (a ``probe.label_fraction`` share of its labels) and scored on test.

An artifact's record row: ``quality`` is the linear probe's (the scalars every record has, so ``compare``
ranks encoders like classifiers), with ``quality.probe`` holding both probes' details, ``stain_cosine``
(PLISM's idea: the cosine between a test tile's embeddings under two synthetic re-stainings) and
``embed_dim``. Parity against the source artifact is embedding agreement (mean cosine where the widths
match, kNN-neighbour overlap always) and, completed once every row exists (``complete``), the change of
probe balanced accuracy in percentage points.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from patholite.artifacts.qat import save_qat_artifact
from patholite.artifacts.sidecar import SIDECAR, read_sidecar
from patholite.compress.qat import convert_qat, prepare_qat
from patholite.config.checks import require
from patholite.data import HistologyDataModule, build_datamodule
from patholite.data.base import ImageSetDataset
from patholite.data.transforms import StainJitter, build_transform
from patholite.io import atomic_path
from patholite.measure.evaluate import artifact_cost
from patholite.measure.probe import (
    apply_probe,
    balanced_accuracy,
    confusions,
    embed,
    knn_probe,
    linear_probe,
    mean_cosine,
    neighbour_overlap,
    subsample_labels,
)
from patholite.models.encoder import ENCODER_KEY, embed_dim
from patholite.models.factory import build_model, create_network
from patholite.pipelines.context import RunContext
from patholite.pipelines.tasks.base import Task
from patholite.pipelines.tasks.encoder_fit import Distilled, FrozenEncoder, distil_features
from patholite.records import QUALITY_SCALARS, ArtifactRecord

log = logging.getLogger(__name__)

Split = tuple[torch.Tensor, torch.Tensor]
PROBE_FILE = "probe.safetensors"  # beside an encoder artifact: its linear probe on dataset= (W, b, mean, std)


def meta_width(model_cfg: Any, image_size: int, named: str) -> int:
    """The embedding width of ``model_cfg``'s headless network, built on the meta device (no weights)."""
    with torch.device("meta"):
        net = create_network(model_cfg, 0, image_size)
    return embed_dim(net, image_size, named)


def teacher_lineage(artifacts: Path) -> dict[str, Any]:
    """``distilled_from`` (each teacher artifact of the run: its name, model and hub provenance) and
    ``licence`` (the teachers' licences, when any has one: a student of a non-commercial foundation model
    is bound by its licence), read from the teacher sidecars the run recorded."""
    teachers = sorted(p for p in artifacts.glob("teacher*_fp32") if (p / SIDECAR).is_file())
    if not teachers:
        return {}
    lineage = []
    for directory in teachers:
        sidecar = read_sidecar(directory)
        lineage.append(
            {
                "artifact": directory.name,
                "model": (sidecar.get("model") or {}).get("name"),
                "weights_source": sidecar.get("weights_source"),
            }
        )
    licences = sorted(
        {str(t["weights_source"]["license"]) for t in lineage if (t["weights_source"] or {}).get("license")}
    )
    return {"distilled_from": lineage, **({"licence": " + ".join(licences)} if licences else {})}


def same_probe(probe: Path | None, test: Split, reference: torch.Tensor) -> dict[str, float]:
    """The source artifact's own linear probe read on this artifact's test embeddings and on the source's:
    the share of test tiles whose predicted class changes (``probe_flip_rate``) and the change of balanced
    accuracy (``same_probe_balanced_accuracy_change_pp``). Unlike refitting a probe per artifact, this
    isolates what quantization or pruning changed from the probe fit's own variation. Empty when the source
    has no probe file or another width."""
    if probe is None or not probe.is_file() or reference.shape != test[0].shape:
        return {}
    head = load_file(str(probe))
    ours, theirs = apply_probe(head, test[0]).argmax(1), apply_probe(head, reference).argmax(1)
    labels, n = test[1].long(), int(head["weight"].shape[1])
    change = balanced_accuracy(confusions(labels, ours, n)) - balanced_accuracy(confusions(labels, theirs, n))
    return {
        "probe_flip_rate": float((ours != theirs).float().mean()),
        "same_probe_balanced_accuracy_change_pp": round(100 * float(change), 3),
    }


class Renormalise(nn.Module):
    """Images normalised one way (the dataset's mean and std) turned into another (an encoder's own), then
    through ``net``: a teacher trained on other statistics sees the tiles it expects."""

    def __init__(self, net: nn.Module, source: tuple[list, list], target: tuple[list, list]) -> None:
        super().__init__()
        self.net = net
        to = lambda v: torch.tensor([float(x) for x in v]).view(1, 3, 1, 1)  # noqa: E731
        self.register_buffer("scale", to(source[1]) / to(target[1]))
        self.register_buffer("shift", (to(source[0]) - to(target[0])) / to(target[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)


def restain(mean: list[float], std: list[float], sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transform of normalised image batches: each tile un-normalised, re-stained by HED jitter of
    strength ``sigma`` (the synthetic generator's stain model), normalised again."""
    m = torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(1, 3, 1, 1)
    jitter = StainJitter(sigma)

    def apply(x: torch.Tensor) -> torch.Tensor:
        raw = (x.cpu() * s + m).clamp(0, 1)
        return ((torch.stack([jitter(tile) for tile in raw]) - m) / s).to(x.device)

    return apply


class EncoderTask(Task):
    name = "encoders"

    def check(self, cfg: DictConfig) -> None:
        m = cfg.model
        require(
            m.family in ("vit", "cnn"),
            f"model={m.name} is a {m.family} model; an encoder is a timm ViT or CNN (its pooled embedding)",
        )
        require(
            not m.pyramid.enabled,
            f"model={m.name}: model.pyramid.enabled=true builds a classifier head over several blocks; an "
            "encoder's embedding is its pooled class token: set model.pyramid.enabled=false",
        )
        meta_width(m, int(cfg.dataset.image_size), f"the student model={m.name}")

    def datamodule(self, cfg: DictConfig, pin_memory: bool) -> HistologyDataModule:
        return build_datamodule(cfg.dataset, pin_memory=pin_memory)

    def new_network(self, ctx: RunContext, model_cfg: DictConfig | None = None) -> nn.Module:
        model_cfg = ctx.cfg.model if model_cfg is None else model_cfg
        return build_model(model_cfg, 0, self.input_size(model_cfg, ctx.cfg))

    def meta(self, ctx: RunContext, model_cfg: DictConfig | None = None) -> dict[str, Any]:
        """An encoder's sidecar; the run's own model (the student, and what is made of it) also carries its
        teachers' provenance (``distilled_from``) and the licences it inherits from them (``licence``)."""
        own = model_cfg is None
        model_cfg = ctx.cfg.model if model_cfg is None else model_cfg
        width = meta_width(model_cfg, self.input_size(model_cfg, ctx.cfg), f"model={model_cfg.name}")
        meta = {**ctx.artifact_meta(model_cfg), ENCODER_KEY: {"embed_dim": width}}
        return {**meta, **(teacher_lineage(ctx.run_dir / "artifacts") if own else {})}

    # ------------------------------------------------------------------------------------ evaluation
    def _loader(self, ctx: RunContext, split: str) -> DataLoader:
        """``split`` with the evaluation transform, in order (train too: probes read clean tiles)."""
        d = ctx.cfg.dataset
        images = ctx.datamodule.splits[split]
        return DataLoader(
            ImageSetDataset(images, build_transform(d, train=False)),
            batch_size=d.eval_batch_size or d.batch_size,
            shuffle=False,
            num_workers=d.num_workers,
        )

    def _embed(
        self, ctx: RunContext, net: nn.Module, split: str, device: Any, transform: Callable | None = None
    ) -> Split:
        return embed(net, self._loader(ctx, split), device, transform=transform)

    def evaluate(
        self,
        ctx: RunContext,
        name: str,
        net: nn.Module,
        directory: Path,
        files: list[str],
        source: str | None = None,
        reference: torch.Tensor | None = None,
        cpu: bool = False,
        defer_timing: bool = False,
    ) -> tuple[ArtifactRecord, torch.Tensor]:
        device = torch.device("cpu") if cpu else ctx.accelerator.device
        meta = read_sidecar(directory)
        runner = self.runner(ctx, net, meta).to(device)
        p, d = ctx.cfg.probe, ctx.cfg.dataset
        train = self._embed(ctx, runner, "train", device)
        if p.label_fraction < 1:
            keep = subsample_labels(train[1], p.label_fraction, ctx.cfg.seed)
            train = (train[0][keep], train[1][keep])
        val, test = self._embed(ctx, runner, "val", device), self._embed(ctx, runner, "test", device)
        names = list(ctx.datamodule.class_names)
        linear = linear_probe(train, val, test, names, tuple(p.l2_grid), int(p.max_iter), ctx.cfg.seed)
        knn = knn_probe(train, test, names, int(p.knn_k), float(p.knn_temperature))
        quality = dict(linear["quality"])
        quality["probe"] = {
            "linear": {
                "balanced_accuracy_ci95": linear["quality"].get("balanced_accuracy_ci95"),
                "l2": linear["l2"],
                "val_balanced_accuracy": linear["val_balanced_accuracy"],
            },
            "knn": {
                **{k: knn["quality"][k] for k in QUALITY_SCALARS},
                "balanced_accuracy_ci95": knn["quality"].get("balanced_accuracy_ci95"),
                "k": knn["k"],
                "temperature": float(p.knn_temperature),
            },
            "label_fraction": float(p.label_fraction),
            "n_train_labels": int(train[1].numel()),
        }
        quality["embed_dim"] = int(test[0].shape[1])
        quality["stain_cosine"] = self._stain_cosine(ctx, runner, device)
        size = int(d.image_size)
        cost = artifact_cost(net, directory, files, size, ctx.cfg.bench, device, defer_timing)
        with atomic_path(Path(directory) / PROBE_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in linear["head"].items()}, str(tmp))
        parity = None
        if reference is not None:
            parity = {
                "against": source or "reference",
                "mean_cosine": mean_cosine(test[0], reference) if reference.shape == test[0].shape else None,
                "neighbour_overlap": neighbour_overlap(test[0], reference, int(p.knn_k)),
                "n_samples": int(test[0].shape[0]),
                **same_probe(ctx.artifact_dir(source) / PROBE_FILE if source else None, test, reference),
            }
        record = ArtifactRecord(
            name=name,
            path=str(directory),
            files=files,
            quality=quality,
            cost=cost,
            source=source,
            parity=parity,
            model=(meta.get("model") or {}).get("name"),
        )
        return record, test[0]

    def runner(self, ctx: RunContext, net: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """``net`` fed as its sidecar asks: the dataset's normalised tiles turned into its own statistics."""
        d = ctx.cfg.dataset
        ours = ([float(v) for v in d.mean], [float(v) for v in d.std])
        theirs = (
            [float(v) for v in meta.get("mean") or ours[0]],
            [float(v) for v in meta.get("std") or ours[1]],
        )
        return net if theirs == ours else Renormalise(net, ours, theirs)

    def _stain_cosine(self, ctx: RunContext, net: nn.Module, device: Any) -> float:
        """Mean cosine between each test tile's embeddings under two re-stainings (seeded: every artifact of
        a run sees the same two)."""
        d, sigma = ctx.cfg.dataset, float(ctx.cfg.probe.stain_sigma)
        views = []
        for draw in (1, 2):
            with torch.random.fork_rng():
                torch.manual_seed(ctx.cfg.seed * 1000 + draw)
                views.append(self._embed(ctx, net, "test", device, restain(d.mean, d.std, sigma))[0])
        return mean_cosine(*views)

    # -------------------------------------------------------------------------------------- training
    def finetune(
        self, ctx: RunContext, stage: str, net: nn.Module, ft: DictConfig, source: nn.Module
    ) -> nn.Module:
        """After a structural change (pruning, low-rank): ``net`` learns ``source``'s embeddings (the float
        encoder before the change) on the unlabelled tiles; ``ft.distill`` is implied, no labels needed."""
        if ft.epochs <= 0:
            return net
        done = self._match(ctx, stage, net, source, int(ft.epochs), float(ft.lr), ema=ctx.cfg.compression.ema)
        fitted = done.fitted
        return fitted.ema_net if fitted.ema_net is not None else fitted.net

    def qat(
        self, ctx: RunContext, net: nn.Module, state: dict[str, Any], directory: Path, meta: dict[str, Any]
    ) -> list[str]:
        """R2's QAT-lite for an encoder: FX fake quantization, a fine-tune toward the float encoder's
        embeddings on the unlabelled tiles, then the real INT8 model (kind ``torch_int8_qat``)."""
        q, engine = ctx.cfg.compression.qat, ctx.accelerator.int8_engine
        size = int(ctx.cfg.dataset.image_size)
        prepared = prepare_qat(copy.deepcopy(net).train(), torch.zeros(1, 3, size, size), engine=engine)
        done = self._match(ctx, "qat", prepared, net, int(q.finetune.epochs), float(q.finetune.lr))
        return save_qat_artifact(convert_qat(done.fitted.net.cpu()), directory, {**meta, "engine": engine})

    def _match(
        self,
        ctx: RunContext,
        stage: str,
        net: nn.Module,
        source: nn.Module,
        epochs: int,
        lr: float,
        ema: DictConfig | None = None,
    ) -> Distilled:
        """Fit ``net`` to ``source``'s embeddings, width to width (no projection, no standardisation)."""
        d = ctx.cfg.dataset
        frozen = FrozenEncoder(
            f"the encoder before {stage}",
            str(ctx.cfg.model.name),
            copy.deepcopy(source).cpu().eval(),
            [float(v) for v in d.mean],
            [float(v) for v in d.std],
        )
        width = meta_width(ctx.cfg.model, int(d.image_size), f"model={ctx.cfg.model.name}")
        return distil_features(
            ctx, stage, net, width, [frozen], epochs, lr, "identity", False, nested=[], ema=ema, patch=False
        )

    def outputs(self, ctx: RunContext, net: nn.Module) -> torch.Tensor:
        return self._embed(ctx, net, "test", "cpu")[0]

    def complete(self, records: list[ArtifactRecord]) -> None:
        """Each row's parity gains the change of probe balanced accuracy against its source's row."""
        by_name = {r.name: r for r in records}
        for record in records:
            src = by_name.get(record.source or "")
            if record.parity is None or src is None:
                continue
            for key, ours, theirs in (
                ("balanced_accuracy_change_pp", record.quality, src.quality),
                (
                    "knn_balanced_accuracy_change_pp",
                    record.quality["probe"]["knn"],
                    src.quality["probe"]["knn"],
                ),
            ):
                record.parity[key] = round(100 * (ours["balanced_accuracy"] - theirs["balanced_accuracy"]), 3)

    def times_together(self, ctx: RunContext) -> bool:
        return ctx.cfg.bench.isolation == "child" and ctx.accelerator.device.type == "cpu"
