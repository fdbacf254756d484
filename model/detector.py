"""TinyDetector: VGG16 conv base plus two 3x3 prediction convs on its last feature map."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from model.priors import boxes_per_cell, create_prior_boxes, grid_size_for
from model.vgg import build_vgg16_features, load_vgg16_weights, vgg16_channels
from utils.postprocess import Detections, detect_objects

logger = logging.getLogger(__name__)

__all__ = ["ModelConfigError", "TinyDetector"]


class ModelConfigError(ValueError):
    """Invalid model option or input shape."""


class TinyDetector(nn.Module):
    """Single-shot detector on a VGG16 (or VGG16-BN) conv base.

    The base maps ``(N, 3, S, S)`` to a ``(S // 32) x (S // 32)`` map (7 x 7 at 224) of ``512 * width_mult``
    channels; one 3x3 conv predicts 4 offsets and one predicts ``n_classes`` logits for each of the
    ``boxes_per_cell(scales, aspect_ratios)`` priors of every cell.

    Args:
        n_classes: number of classes including background (21 for VOC).
        width_mult: channel multiplier of the base (``1.0`` = VGG16; ImageNet weights need 1.0).
        batch_norm: VGG16-BN layout instead of VGG16.
        pretrained: load torchvision's ImageNet weights into the base (downloads them).
        weights_path: local torchvision ``vgg16`` / ``vgg16_bn`` state_dict to load instead.
        image_size: side of the square input images.
        scales, aspect_ratios: prior shapes (see :func:`model.priors.create_prior_boxes`).
        variances: box coding variances used by :meth:`detect_objects`.
        head_prior_prob: if set, the class logits' biases start at ``-log((1 - p) / p)`` (RetinaNet's
            prior-probability init, for focal losses) and the background bias at 0; else all biases are 0.
        score_activation: how :meth:`detect_objects` turns the logits into class scores by default:
            ``"softmax"``, or ``"sigmoid"`` for a model trained with the sigmoid focal loss (see
            :func:`model.loss.score_activation_for`).
    """

    def __init__(self, n_classes: int, *, width_mult: float = 1.0, batch_norm: bool = False,
                 pretrained: bool = False, weights_path: str | Path | None = None, image_size: int = 224,
                 scales: Sequence[float] = (0.2, 0.4, 0.6), aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5),
                 variances: Sequence[float] = (0.1, 0.2), head_prior_prob: float | None = None,
                 score_activation: str = "softmax") -> None:
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ModelConfigError(
                f"n_classes counts background and must be an integer >= 2, got {n_classes!r}"
            )
        if not (isinstance(width_mult, (int, float)) and math.isfinite(width_mult) and width_mult > 0):
            raise ModelConfigError(f"width_mult must be a finite number > 0, got {width_mult!r}")
        if (pretrained or weights_path is not None) and width_mult != 1.0:
            raise ModelConfigError(
                f"ImageNet weights (pretrained={pretrained}, weights_path={weights_path}) only fit "
                f"width_mult=1.0, got width_mult={width_mult}"
            )
        if len(variances) != 2 or not all(math.isfinite(v) and v > 0 for v in variances):
            raise ModelConfigError(f"variances must be two finite numbers > 0, got {variances!r}")
        if head_prior_prob is not None and not 0.0 < head_prior_prob < 1.0:
            raise ModelConfigError(f"head_prior_prob must be in (0, 1), got {head_prior_prob!r}")
        if score_activation not in ("softmax", "sigmoid"):
            raise ModelConfigError(f"score_activation must be 'softmax' or 'sigmoid', got {score_activation!r}")

        self.n_classes = n_classes
        self.score_activation = score_activation
        self.image_size = image_size
        self.variances = (float(variances[0]), float(variances[1]))
        self.grid_size = grid_size_for(image_size)
        self.boxes_per_cell = boxes_per_cell(scales, aspect_ratios)

        self.base = build_vgg16_features(width_mult, batch_norm)
        load_vgg16_weights(self.base, batch_norm=batch_norm, pretrained=pretrained, weights_path=weights_path)
        channels = vgg16_channels(width_mult)[-1]
        self.loc_head = nn.Conv2d(channels, self.boxes_per_cell * 4, kernel_size=3, padding=1)
        self.cls_head = nn.Conv2d(channels, self.boxes_per_cell * n_classes, kernel_size=3, padding=1)
        self._init_head(head_prior_prob)

        # Derived from the config, so not saved in checkpoints; moves with .to(device).
        self.register_buffer(
            "priors_cxcywh", create_prior_boxes(self.grid_size, scales, aspect_ratios), persistent=False
        )

    @property
    def n_priors(self) -> int:
        return self.priors_cxcywh.shape[0]

    def _init_head(self, head_prior_prob: float | None) -> None:
        for conv in (self.loc_head, self.cls_head):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        if head_prior_prob is not None:
            bias = self.cls_head.bias.data.view(self.boxes_per_cell, self.n_classes)
            bias[:, 1:] = -math.log((1.0 - head_prior_prob) / head_prior_prob)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Raw predictions.

        Args:
            images: ``(N, 3, S, S)`` RGB images normalized with ImageNet mean/std, ``S = image_size``
                (the uint8 batches of the data pipeline after :func:`data.transforms.normalize_images`).

        Returns:
            ``(locs (N, P, 4), scores (N, P, n_classes))``: offsets and raw logits, priors in the order of
            :func:`model.priors.create_prior_boxes`.
        """
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ModelConfigError(
                f"expected images of shape (N, 3, {self.image_size}, {self.image_size}) for "
                f"image_size={self.image_size}, got {tuple(images.shape)}"
            )
        return self.predict(self.base(images))

    def predict(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """Prediction convs on the base's ``(N, c, g, g)`` feature map; outputs as :meth:`forward`."""
        n, _, rows, columns = features.shape
        n_priors = rows * columns * self.boxes_per_cell
        # NCHW -> NHWC puts the channels of one cell together: (row, column, prior slot, value) is the
        # order of create_prior_boxes. reshape, not view: the permuted tensor is not contiguous in NCHW.
        # The prior count is given, not inferred: a batch of 0 images has no size to infer it from.
        locs = self.loc_head(features).permute(0, 2, 3, 1).reshape(n, n_priors, 4)
        scores = self.cls_head(features).permute(0, 2, 3, 1).reshape(n, n_priors, self.n_classes)
        return locs, scores

    def detect_objects(self, locs: Tensor, scores: Tensor, min_score: float = 0.01, max_overlap: float = 0.45,
                       top_k: int = 200, activation: str | None = None,
                       box_voting_iou: float | None = None) -> list[Detections]:
        """Per-image detections from :meth:`forward`'s outputs (:func:`utils.postprocess.detect_objects`);
        ``activation`` defaults to the model's ``score_activation``."""
        return detect_objects(locs, scores, self.priors_cxcywh, min_score=min_score, max_overlap=max_overlap,
                              top_k=top_k, variances=self.variances, activation=activation or self.score_activation,
                              box_voting_iou=box_voting_iou)
