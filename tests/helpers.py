"""Lightning callbacks that interrupt training the way a user or a scheduler would."""

from __future__ import annotations

import os
import signal

import lightning as L


class InterruptAt(L.Callback):
    """At global step ``step``: raise KeyboardInterrupt (Ctrl-C) or send this process SIGTERM (a kill)."""

    def __init__(self, step: int = 2, kind: str = "keyboard") -> None:
        self.step = step
        self.kind = kind

    def on_train_batch_end(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.global_step != self.step:
            return
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise KeyboardInterrupt
