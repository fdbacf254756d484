"""Tiny-Detector model: priors, VGG16 conv base, detector and loss."""

from model.detector import ModelConfigError, TinyDetector
from model.loss import LossOutput, MultiBoxLoss, score_activation_for
from model.priors import boxes_per_cell, create_prior_boxes

__all__ = [
    "LossOutput",
    "ModelConfigError",
    "MultiBoxLoss",
    "TinyDetector",
    "boxes_per_cell",
    "create_prior_boxes",
    "score_activation_for",
]
