"""EMA of weights (R2: m_t = b*m_{t-1} + (1-b)*theta_t, b = 0.999), a Lightning callback on timm's
ModelEmaV3.

timm does the averaging (foreach lerp over parameters and buffers); the callback decides when, and swaps
the averaged weights in for validation and test so that model selection and reported quality use them.

Short runs: with a fixed b = 0.999, 300 steps leave 0.999**300 = 74% of the average on the initial random
weights. So the decay warms up (timm's ``1 - (1 + step)**-power``, capped at ``decay``) and the average
starts at ``start_step``; with ``warmup=false`` the decay is the fixed ``decay`` from the first update.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

EMA_STATE_KEY = "ema_state_dict"


class EmaCallback(L.Callback):
    """Keep an EMA of ``pl_module.net`` and evaluate with it.

    The module's own weights stay the raw, trained ones; ``ema_net`` holds the average. Checkpoints carry the
    average under ``ema_state_dict`` so a resumed run continues it.
    """

    def __init__(
        self,
        decay: float = 0.999,
        start_step: int = 0,
        warmup: bool = True,
        warmup_power: float = 0.75,
    ) -> None:
        if not 0.0 < decay < 1.0:  # compression.ema.decay is checked in preflight
            raise ValueError(f"EMA decay={decay} must lie in (0, 1)")
        self.decay = decay
        self.start_step = start_step
        self.warmup = warmup
        self.warmup_power = warmup_power
        self.ema: ModelEmaV3 | None = None
        self._raw: dict[str, torch.Tensor] | None = None
        self._pending_state: dict[str, torch.Tensor] | None = None

    @property
    def ema_net(self) -> nn.Module:
        if self.ema is None:
            raise RuntimeError("EMA was never set up: the callback has not seen a training start")
        return self.ema.module

    def _ensure(self, pl_module: L.LightningModule) -> ModelEmaV3:
        if self.ema is None:
            self.ema = ModelEmaV3(
                pl_module.net,
                decay=self.decay,
                update_after_step=self.start_step,
                use_warmup=self.warmup,
                warmup_power=self.warmup_power,
            )
            if self._pending_state is not None:
                self.ema.module.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.ema

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure(pl_module).to(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # global_step counts optimizer steps; timm's update treats steps <= start as "copy the weights".
        self._ensure(pl_module).update(pl_module.net, step=trainer.global_step)

    # Validation and test see the averaged weights; training continues from the raw ones.
    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self.ema is None or self._raw is not None:
            return
        self._raw = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}
        pl_module.net.load_state_dict(self.ema.module.state_dict())

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._raw is not None:
            pl_module.net.load_state_dict(self._raw)
            self._raw = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Checkpoints are written after validation (swapped back), so state_dict holds the raw weights.
        if self.ema is not None:
            checkpoint[EMA_STATE_KEY] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(EMA_STATE_KEY)
        if state is None:
            return
        if self.ema is None:
            self._pending_state = state
        else:
            self.ema.module.load_state_dict(state)
