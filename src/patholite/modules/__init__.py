"""LightningModules: the plain classifier (teacher) and SMT (R3); distillation students come later."""

from patholite.modules.classifier import ClassifierModule
from patholite.modules.smt import SMTModule

__all__ = ["ClassifierModule", "SMTModule"]
