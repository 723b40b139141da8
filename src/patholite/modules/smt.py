"""SMT training (R3): staged layers, focusing memory, backward reform, weak slide-level supervision.

Manual optimisation with two SGD optimisers: the encoders (and their heads) minimise ``L_V``, the focusing
predictors ``L_F`` (see ``models.smt_focus``). Layer l trains from ``start_epochs[l]``; its deeper inputs are
read from the slide through ``region_reader(slide) -> reader`` (``reader.read(box, size)``), taken from the
constructor or else from ``trainer.datamodule.region_reader``.

Weak supervision: a layer's focused images inherit the slide label; one extra lowest-score patch per image
goes to the next layer as a negative-class image and is not focused further. Validation and test diagnose
each slide with the inference walk up to the deepest trained layer and log the ClassifierModule's metrics.

Hyperparameters are plain containers and the focusing memory is plain lists and tensors, so checkpoints
load with ``torch.load(weights_only=True)``.

Under DDP each rank trains on its share of the slides and the focusing memory is all-gathered after every
training step (``FocusMemory.synchronise``), not once per epoch: a key is updated once per epoch, so either
gives the same memory at an epoch's end, but only the per-step exchange gives every rank, and a checkpoint
that rank 0 writes mid-epoch (interruption, requeue), every update made so far. It costs one small
collective per step (the keys updated in it and their P floats each) beside DDP's gradient all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from patholite.compress.distill import kd_loss
from patholite.errors import ConfigError
from patholite.measure.metrics import attach_eval_metrics
from patholite.models.factory import build_model
from patholite.models.smt import (
    SMTNet,
    aggregate_slides,
    attention_gradient,
    attention_probe,
    check_top_k,
    focus_walk,
    positive_classes,
    read_regions,
    to_input,
)
from patholite.models.smt_aggregate import training_aggregate
from patholite.models.smt_focus import (
    FocusMemory,
    active_layers,
    check_start_epochs,
    cls_loss,
    emb_loss,
    focus_key,
    focus_loss,
    process_group_gather,
    ret_loss,
    schedule_weights,
)
from patholite.wsi.region import Box, patch_box

MEMORY_KEY = "smt_focus_memory"
DEPTH_KEY = "smt_trained_depth"


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _weighted(weights: Sequence[float], terms: Sequence[torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """``sum_l weights[l] * terms[l]`` over the terms computed (layers not yet active have none)."""
    return sum((w * t for w, t in zip(weights, terms, strict=False)), zero)


@contextmanager
def one_scaler_update(scaler: torch.amp.GradScaler | None) -> Iterator[None]:
    """Several optimiser steps after one backward, with one ``scaler.update()`` after the last.

    Lightning's mixed-precision plugin updates the scaler in every ``optimizer.step()``. With two
    optimisers the second was then unscaled by the scale the first step's update had already changed
    (halved on an overflow, doubled on growth) and the scale moved twice per step. GradScaler's own recipe
    for several optimisers: unscale and step each, update once.
    """
    if scaler is None:
        yield
        return
    scaler.update = lambda new_scale=None: None  # shadows the method for the steps inside
    try:
        yield
    finally:
        del scaler.update
    scaler.update()


def _boxes(rows: torch.Tensor) -> list[Box]:
    return [Box(*(float(v) for v in row)) for row in rows.tolist()]


class SMTModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        class_names: list[str],
        mean: Sequence[float],
        std: Sequence[float],
        class_weights: list[float] | None = None,
        negative_class: int = 0,
        eval_depth: int | None = None,
        gradient_clip_val: float | None = None,
        load_checkpoint: bool = True,
        region_reader: Callable[[int], Any] | None = None,
        net: SMTNet | None = None,
        teacher: SMTNet | None = None,
        kd: dict[str, Any] | None = None,
        memory: dict[str, Any] | None = None,
    ) -> None:
        """``model``: the plain ``model`` config node (``family: smt`` with its ``smt`` block);
        ``class_weights``: per-class CE weights (resolve ``class_weights: auto`` before, e.g. with
        ``smt_focus.class_weights_from_counts``); ``negative_class``: index of the negative class;
        ``eval_depth``: walk depth for validation/test (None: the deepest layer trained so far);
        ``gradient_clip_val``: gradient-norm clip per optimiser, done here on unscaled gradients
        (``on_before_optimizer_step``; Lightning refuses its own clipping
        under manual optimisation: build the Trainer with ``gradient_clip_val=None``); ``memory``: a trained
        module's ``memory.state_dict()`` to continue (its epochs restart at 0)."""
        model = dict(_plain(model))
        class_names = [str(c) for c in class_names]
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        class_weights = None if class_weights is None else [float(w) for w in _plain(class_weights)]
        super().__init__()
        self.save_hyperparameters(ignore=["region_reader", "net", "teacher", "memory"])
        self.automatic_optimization = False
        smt = dict(model.get("smt") or {})
        if not smt:
            raise ConfigError("SMTModule needs model.smt (image_size, grid, top_k, ...); use model=smt")
        self.class_names = class_names
        if net is None:
            spec = model if load_checkpoint else {**model, "checkpoint": None}
            net = build_model(spec, len(class_names), int(smt["image_size"]))
        if not isinstance(net, SMTNet):
            raise ConfigError(f"SMTModule trains an SMTNet (model.family=smt), got {type(net).__name__}")
        self.net = net
        self.k = check_top_k(int(smt.get("top_k", 4)), net.grid)
        self.starts = check_start_epochs(smt.get("start_epochs", [0, 20, 50][: net.layers]), net.layers)
        lrs = [float(v) for v in smt.get("lrs", [0.002] * (net.layers - 1) + [0.01])]
        if len(lrs) != net.layers:
            raise ConfigError(f"model.smt.lrs={lrs}: give one learning rate per layer ({net.layers})")
        self.lrs = lrs
        self.weights_cfg = {
            "fwd_weight": float(smt.get("fwd_weight", 1.0)),
            "bwd_weight": float(smt.get("bwd_weight", 0.1)),
            "ramp_epochs": float(smt.get("ramp_epochs", 5)),
            "reform": list(smt.get("reform", ["ret", "emb"])),
        }
        schedule_weights(0, self.starts, **self.weights_cfg)  # validates reform
        self.aggregate = training_aggregate(str(smt.get("aggregate", "mean")))  # attention: fitted after
        aggregate_slides(torch.ones(1, 2), [0], 1, self.aggregate)  # validates aggregate
        self.emb_reduction = str(smt.get("emb_reduction", "mean"))
        self.weak_negative = bool(smt.get("weak_negative", True))
        self.negative_class = int(negative_class)
        if not 0 <= self.negative_class < len(class_names):
            raise ConfigError(f"negative class {negative_class} is not one of the {len(class_names)} classes")
        self.positive = positive_classes(len(class_names), self.negative_class)
        self.mean, self.std = mean, std
        self.eval_depth = eval_depth
        self.gradient_clip_val = gradient_clip_val
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)
        self.memory = FocusMemory(float(smt.get("eps", 0.9)))
        if memory is not None:  # fine-tuning a trained SMT (QAT): its focusing targets keep their average
            self.memory.load_state_dict(memory)
            self.memory.restart_epochs()
        # distillation from a trained float SMT: every layer's logits on the images this student focuses on.
        # A tuple keeps the teacher out of the module tree (parameters, state_dict, optimisers).
        self._teacher: tuple[SMTNet, ...] = ()
        if teacher is not None:
            if (teacher.image_size, teacher.grid, teacher.layers) != (net.image_size, net.grid, net.layers):
                raise ConfigError(
                    f"the SMT teacher sees {teacher.image_size}-px images in a {teacher.grid}-grid with "
                    f"{teacher.layers} layers, the student {net.image_size}/{net.grid}/{net.layers}: they "
                    "must match (model.smt.image_size, grid, layers)"
                )
            self._teacher = (teacher.eval().requires_grad_(False),)
        self.kd = {"alpha": 0.5, "temperature": 4.0, "kind": "soft", **dict(_plain(kd or {}))}
        self.trained_depth = 0
        self._region_reader = region_reader
        attach_eval_metrics(self, len(class_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # ------------------------------------------------------------------------------------------ reading
    def region_reader(self, slide: int) -> Any:
        source = self._region_reader
        if source is None and self._trainer is not None:
            source = getattr(self._trainer.datamodule, "region_reader", None)
        if source is None:
            raise ConfigError(
                "SMT reads focused regions from the slides: give SMTModule(region_reader=...) or train with "
                "a datamodule that has region_reader(slide) (the slide-level data families)"
            )
        return source(int(slide))

    # ---------------------------------------------------------------------------------------- training
    def loss_weights(self, epoch: float) -> dict[str, list[float]]:
        return schedule_weights(epoch, self.starts, **self.weights_cfg)

    def step_losses(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, Any]:
        """All loss terms of one batch at ``epoch`` (lists per layer / layer pair) and the totals
        ``loss_v``, ``loss_f``, ``loss``; updates the focusing memory. ``reads``: regions read."""
        net, k, grid = self.net, self.k, self.net.grid
        depth = active_layers(epoch, self.starts)
        terms: dict[str, Any] = {"cls": [], "focus": [], "ret": [], "emb": [], "reads": 0, "depth": depth}
        labels = batch["label"].long()
        slides = [int(s) for s in batch["slide"].tolist()]
        x = to_input(batch["image"], self.mean, self.std)
        owners, paths, boxes = list(range(len(slides))), [()] * len(slides), _boxes(batch["box"])
        n_focused, pending, readers = len(slides), None, None
        for layer in range(depth):
            has_predictor = layer < net.layers - 1
            encoder = net.encoders[layer]
            with attention_probe(encoder) if has_predictor else nullcontext([]) as captured:
                logits, cls, patches = net.encode(layer, x)
            terms["cls"].append(self._label_loss(layer, x, logits, labels, terms))
            if pending is not None:  # backward reform of the previous layer, now that this one has run
                chosen, cls_prev = pending
                p_next = logits[: chosen.numel()].float().softmax(-1)[:, self.positive].sum(-1)
                terms["ret"].append(ret_loss(chosen, p_next.view_as(chosen)))
                cls_next = cls[: chosen.numel()].view(len(cls_prev), k, -1)
                terms["emb"].append(emb_loss(cls_prev, cls_next, self.emb_reduction))
            if not has_predictor:
                break
            grads = attention_gradient(
                logits, captured[0], self.positive, encoder.num_prefix_tokens, retain_graph=True
            )[:n_focused]
            keys = [focus_key(slides[o], p) for o, p in zip(owners, paths, strict=True)]
            targets = self.memory.update(keys, grads, epoch)
            scores = net.focus(layer, patches[:n_focused])
            terms["focus"].append(focus_loss(scores, targets))
            if layer + 1 >= depth:
                break
            top = scores.detach().topk(k, dim=1).indices
            pending = (scores.gather(1, top), cls[:n_focused])
            rows = top.cpu().tolist()
            next_owners = [owners[j] for j, row in enumerate(rows) for _ in row]
            next_paths = [(*paths[j], i) for j, row in enumerate(rows) for i in row]
            next_boxes = [patch_box(boxes[j], i, grid) for j, row in enumerate(rows) for i in row]
            next_labels = labels[:n_focused].repeat_interleave(k)
            read_owners, read_boxes = list(next_owners), list(next_boxes)
            if self.weak_negative and k < grid * grid:
                low = scores.detach().argmin(dim=1).cpu().tolist()
                read_owners += owners[:n_focused]
                read_boxes += [patch_box(boxes[j], i, grid) for j, i in enumerate(low)]
                negatives = torch.full((n_focused,), self.negative_class, dtype=torch.long)
                next_labels = torch.cat([next_labels, negatives.to(labels.device)])
            if readers is None:
                readers = [self.region_reader(s) for s in slides]
            images = read_regions(readers, read_owners, read_boxes, net.image_size).to(self.device)
            terms["reads"] += len(read_boxes)
            x, labels = to_input(images, self.mean, self.std), next_labels
            owners, paths, boxes, n_focused = next_owners, next_paths, next_boxes, len(next_boxes)
        w = self.loss_weights(epoch)
        zero = x.new_zeros(())
        terms["loss_v"] = _weighted(w["cls"], terms["cls"], zero) + _weighted(w["emb"], terms["emb"], zero)
        terms["loss_f"] = _weighted(w["focus"], terms["focus"], zero) + _weighted(
            w["ret"], terms["ret"], zero
        )
        terms["loss"] = terms["loss_v"] + terms["loss_f"]
        return terms

    def _label_loss(self, layer: int, x, logits, labels, terms: dict[str, Any]) -> torch.Tensor:
        """L_cls of one layer; with a teacher (1-a)*L_cls + a*distillation from the teacher's same layer."""
        loss = cls_loss(logits, labels, self.class_weight)
        if not self._teacher:
            return loss
        teacher = self._teacher[0].to(x.device)
        with torch.no_grad():
            teacher_logits = teacher.encode(layer, x)[0]
        kd = self.kd
        distill = kd_loss(
            logits, teacher_logits, labels, alpha=1.0, temperature=float(kd["temperature"]), kind=kd["kind"]
        )
        terms.setdefault("kd", []).append(distill.detach())
        alpha = float(kd["alpha"])
        return (1 - alpha) * loss + alpha * distill

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        epoch = self.current_epoch
        terms = self.step_losses(batch, epoch)
        # every rank, every step (a collective under DDP): the memory is the same on all ranks at each step
        # boundary, so a mid-epoch checkpoint (interruption, requeue) written by rank 0 holds every update
        self.memory.synchronise(process_group_gather())
        if terms["depth"] == 0 or not terms["loss"].requires_grad:
            return None
        self.trained_depth = max(self.trained_depth, terms["depth"])
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(terms["loss"])
        # Each step goes through the precision plugin: with a gradient scaler (16-mixed) it unscales that
        # optimiser's gradients, then calls on_before_optimizer_step (which clips them), then steps.
        with one_scaler_update(self._grad_scaler()):
            for opt in optimizers:
                opt.step()
        logs = {"train/loss": terms["loss"], "train/loss_v": terms["loss_v"], "train/loss_f": terms["loss_f"]}
        for name in ("cls", "focus", "ret", "emb", "kd"):
            logs.update({f"train/{name}_{i}": v.detach() for i, v in enumerate(terms.get(name, []))})
        batch_size = len(batch["label"])
        # sync_dist: under DDP each epoch value is the mean over the ranks (a no-op in one process)
        self.log_dict(logs, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log(
            "train/reads", float(terms["reads"]), on_step=False, on_epoch=True, batch_size=batch_size,
            sync_dist=True,
        )  # fmt: skip
        return terms["loss"].detach()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Clipped here, not before opt.step(): under 16-mixed the gradients are unscaled only inside step,
        # so a clip before it measured the scaled norm (scale x true norm) and shrank every step to ~nothing.
        if self.gradient_clip_val:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The precision plugin's gradient scaler (16-mixed on CUDA or the NPU), else None."""
        trainer = self._trainer
        return None if trainer is None else getattr(trainer.precision_plugin, "scaler", None)

    def configure_optimizers(self):
        cfg = self.hparams.model["smt"]
        momentum, wd = float(cfg.get("momentum", 0.9)), float(cfg.get("weight_decay", 5e-4))
        encoder_groups, predictor_groups = [], []
        for layer, encoder in enumerate(self.net.encoders):
            decay, no_decay = [], []
            for name, param in encoder.named_parameters():
                if param.requires_grad:  # timm's convention: no decay on norms, biases, tokens
                    skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
                    (no_decay if skip else decay).append(param)
            encoder_groups += [
                {"params": decay, "lr": self.lrs[layer], "weight_decay": wd},
                {"params": no_decay, "lr": self.lrs[layer], "weight_decay": 0.0},
            ]
        for layer, predictor in enumerate(self.net.predictors):
            predictor_groups.append({"params": list(predictor.parameters()), "lr": self.lrs[layer]})
        encoder_groups = [g for g in encoder_groups if g["params"]]
        return [
            torch.optim.SGD(encoder_groups, lr=self.lrs[0], momentum=momentum),
            torch.optim.SGD(predictor_groups, lr=self.lrs[0], momentum=momentum, weight_decay=wd),
        ]

    @property
    def complete_from_epoch(self) -> int:
        """The first epoch in which every layer trains: checkpoint selection starts there (an earlier,
        shallower epoch must not be restored with untrained layers)."""
        return int(max(self.starts))

    # -------------------------------------------------------------------------------------- evaluation
    def walk_depth(self) -> int:
        """Validation/test walk depth: ``eval_depth``, else the deepest layer trained (at least layer 1)."""
        if self.eval_depth is not None:
            return max(1, min(int(self.eval_depth), self.net.layers))
        return max(1, min(self.trained_depth, self.net.layers))

    def slide_probs(self, batch: dict[str, torch.Tensor], depth: int | None = None) -> torch.Tensor:
        """Slide class probabilities (B x C) from the inference walk over the batch's thumbnails."""
        depth = self.walk_depth() if depth is None else depth
        slides = batch["slide"].tolist()
        readers = [self.region_reader(s) for s in slides] if depth > 1 else []
        walk = focus_walk(
            self.net, batch["image"], _boxes(batch["box"]), readers, self.k, self.mean, self.std, depth
        )
        last = walk["layers"][-1]
        probs = aggregate_slides(
            last["probs"], last["owners"], len(slides), self.aggregate, self.negative_class
        )
        return probs.to(self.device)

    def _eval_step(self, batch, *collections) -> torch.Tensor:
        labels = batch["label"].long()
        probs = self.slide_probs(batch)
        for metrics in collections:
            metrics.update(probs, labels)
        return F.nll_loss(probs.clamp_min(1e-7).log(), labels)

    def validation_step(self, batch, batch_idx: int) -> None:
        loss = self._eval_step(batch, self.val_metrics, self.val_per_class)
        size = len(batch["label"])
        self.log("val/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict(self.val_metrics, prog_bar=False, batch_size=size)

    def test_step(self, batch, batch_idx: int) -> None:
        loss = self._eval_step(batch, self.test_metrics, self.test_per_class)
        size = len(batch["label"])
        self.log("test/loss", loss, batch_size=size, sync_dist=True)
        self.log_dict(self.test_metrics, batch_size=size)

    def _log_per_class(self, stage: str, metrics) -> None:
        values = metrics.compute()
        for key in ("f1_per_class", "recall_per_class"):
            metric = key.removesuffix("_per_class")
            # sync_dist: equal on every rank already (computed from synced states); it silences Lightning
            named = zip(self.class_names, values[key], strict=True)
            self.log_dict({f"{stage}/{metric}/{name}": v for name, v in named}, sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val", self.val_per_class)
        self.log("val/depth", float(self.walk_depth()), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test", self.test_per_class)

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[MEMORY_KEY] = self.memory.state_dict()
        checkpoint[DEPTH_KEY] = int(self.trained_depth)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if MEMORY_KEY in checkpoint:
            self.memory.load_state_dict(checkpoint[MEMORY_KEY])
        self.trained_depth = int(checkpoint.get(DEPTH_KEY, self.trained_depth))
