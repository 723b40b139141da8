"""Networks: a factory over timm, local weights, and R1's pyramid multi-scale head."""

from patholite.models.factory import build_model, classifier_keys, read_state_dict

__all__ = ["build_model", "classifier_keys", "read_state_dict"]
