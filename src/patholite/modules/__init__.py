"""LightningModules: the plain classifier (teacher); distillation students and SMT come later."""

from patholite.modules.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
