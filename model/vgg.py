"""VGG16 / VGG16-BN convolutional base (conv1_1 .. pool5) with a width multiplier.

Layers sit at the same indices as ``torchvision.models.vgg16(...).features`` (or ``vgg16_bn``), so at
width 1.0 torchvision's ImageNet state_dict loads as is once its ``features.`` prefix is stripped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torch.hub import load_state_dict_from_url
from torchvision.models import VGG16_BN_Weights, VGG16_Weights

logger = logging.getLogger(__name__)

__all__ = ["VGG16_LAYOUT", "WeightsError", "build_vgg16_features", "load_vgg16_weights", "vgg16_channels"]

# torchvision's configuration "D": output channels of each 3x3 conv, "M" for a 2x2 max pool.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class WeightsDownloadError(RuntimeError):
    """The ImageNet weights could not be downloaded (offline machine); the message says what to do."""


class WeightsError(ValueError):
    """A VGG16 weights file that is missing, unreadable or does not fit the conv base."""


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))


def vgg16_channels(width_mult: float = 1.0) -> list[int]:
    """Output channels of the five conv blocks, e.g. ``[16, 32, 64, 128, 128]`` at width 0.25."""
    return [_scaled(c, width_mult) for c in (64, 128, 256, 512, 512)]


def build_vgg16_features(width_mult: float = 1.0, batch_norm: bool = False) -> nn.Sequential:
    """The conv base as an ``nn.Sequential``: ``(N, 3, S, S) -> (N, 512 * width_mult, S // 32, S // 32)``.

    Weights use torchvision's VGG initialisation (Kaiming normal, fan-out; BN weight 1, bias 0).
    """
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = _scaled(int(item), width_mult)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    features = nn.Sequential(*layers)
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return features


def _imagenet_weights(batch_norm: bool) -> VGG16_Weights | VGG16_BN_Weights:
    return VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1


def _features_state_dict(state_dict: object, source: str) -> dict[str, torch.Tensor]:
    """Keep the ``features.*`` entries of a torchvision VGG state_dict, prefix stripped."""
    if not isinstance(state_dict, dict):
        raise WeightsError(
            f"{source}: expected a torchvision VGG16 state_dict (a dict), got {type(state_dict).__name__}"
        )
    features = {k[len("features."):]: v for k, v in state_dict.items()
                if isinstance(k, str) and k.startswith("features.")}
    if not features:
        sample = ", ".join(list(map(str, state_dict))[:3])
        raise WeightsError(f"{source}: no 'features.*' keys, so it is not a torchvision VGG16 state_dict "
                           f"(first keys: {sample or 'none'})")
    for key, value in features.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{source}: features.{key} is a {type(value).__name__}, not a tensor, so it is "
                               "not a torchvision VGG16 state_dict")
    return features


def _why_unreadable(error: Exception) -> str:
    """Why ``torch.load`` failed, in a line: its unpickling errors go on with advice that does not apply
    (among it, to turn ``weights_only`` off, which would run any code the file holds)."""
    message = str(error)
    if "Unsupported global" in message:  # torch's words for a pickled class in a weights-only load
        reason = ("it holds pickled Python objects (such as a whole model saved with torch.save(model)), which "
                  "are not loaded as they could run code; save the model's state_dict() instead")
    elif "Weights only load failed" in message:
        reason = "not a file written by torch.save, or a damaged one"
    else:
        lines = message.strip().splitlines()
        reason = lines[0] if lines else ""
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def load_vgg16_weights(features: nn.Sequential, *, batch_norm: bool, pretrained: bool = False,
                       weights_path: str | Path | None = None) -> None:
    """Load ImageNet weights into a width-1.0 conv base built by :func:`build_vgg16_features`.

    ``weights_path`` (a torchvision ``vgg16`` / ``vgg16_bn`` state_dict file) wins over ``pretrained``,
    which downloads torchvision's weights (or takes them from the torch hub cache). Without either,
    nothing is loaded.

    Raises:
        WeightsError: the file is missing, unreadable, or its tensors do not fit this conv base.
        RuntimeError: the download failed (e.g. offline); the message says how to pass a local file.
    """
    weights = _imagenet_weights(batch_norm)
    file_name = weights.url.rsplit("/", 1)[-1]
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsError(f"model.weights_path={path}: no such file (expected a torchvision "
                               f"{'vgg16_bn' if batch_norm else 'vgg16'} state_dict such as {file_name})")
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unpickling failure means the same to the user
            raise WeightsError(
                f"model.weights_path={path}: cannot read it as a torch state_dict ({_why_unreadable(exc)})"
            ) from None
        source = f"model.weights_path={path}"
    elif pretrained:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
        try:
            # weights_only: a file already in the hub cache is loaded without its hash being checked, and
            # a full unpickle of a planted one would run its code.
            state_dict = load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True)
        except Exception as exc:  # URLError, OSError, hash mismatch, unpickling: all end here
            if cached.is_file():
                raise WeightsError(
                    f"cannot read the cached ImageNet VGG16 weights {cached} ({_why_unreadable(exc)}); delete that "
                    "file to download it again, or pass model.weights_path"
                ) from None
            raise WeightsDownloadError(
                f"could not download the ImageNet VGG16 weights from {weights.url} ({exc}). Download that "
                f"file on a machine with internet access and pass model.weights_path=/path/to/{file_name} "
                "(a torchvision state_dict), or set model.pretrained=false to train from scratch."
            ) from exc
        source = str(cached) if cached.is_file() else weights.url
    else:
        return

    features_sd = _features_state_dict(state_dict, source)
    own = features.state_dict()
    # torchvision's vgg16_bn file predates BatchNorm's batch counter; load_state_dict sets the counter to 0
    # for files without it, as torchvision's own loading does.
    optional = {k for k in own if k.endswith(".num_batches_tracked")}
    missing = sorted(set(own) - set(features_sd) - optional, key=_layer_order)
    unexpected = sorted(set(features_sd) - set(own), key=_layer_order)
    wrong_shape = [k for k in own if k in features_sd and features_sd[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        variant = "vgg16_bn (batch_norm=True)" if batch_norm else "vgg16 (batch_norm=False)"
        details = []
        if missing:
            details.append(f"missing features.{missing[0]} (+{len(missing) - 1} more)")
        if unexpected:
            details.append(f"unexpected features.{unexpected[0]} (+{len(unexpected) - 1} more)")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(
                f"features.{k} has shape {tuple(features_sd[k].shape)}, expected {tuple(own[k].shape)}"
            )
        raise WeightsError(
            f"{source}: does not fit the {variant} conv base at width 1.0: {'; '.join(details)}"
        )
    features.load_state_dict(features_sd, strict=True)
    logger.info("loaded VGG16 conv base weights from %s", source)


def _layer_order(key: str) -> tuple[int, str]:
    index, _, rest = key.partition(".")
    return (int(index), rest) if index.isdigit() else (1 << 30, key)
