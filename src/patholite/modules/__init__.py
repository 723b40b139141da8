"""LightningModules: the plain classifier (teacher), SMT (R3), label-free feature distillation."""

from patholite.modules.classifier import ClassifierModule
from patholite.modules.encoder import FeatureKdModule
from patholite.modules.smt import SMTModule

__all__ = ["ClassifierModule", "FeatureKdModule", "SMTModule"]
