"""A tiny, fast training set-up shared by the training and evaluation tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch

from utils.config import Config, load_config

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(root: Path, *, name: str = "tiny", epochs: int = 2) -> list[str]:
    """A 12-image synthetic set, a 64x64 input (2x2 grid, 36 priors) and a width-1/16 model: seconds per run."""
    return [
        f"run.name={name}",
        f"run.output_dir={root / 'runs'}",
        f"data.root={root / 'shapes'}",
        f"data.cache_dir={root / 'cache'}",
        "data.synthetic.n_trainval=12",
        "data.synthetic.n_test=6",
        "data.synthetic.image_size=64",
        "data.num_workers=0",
        "data.cache_images=false",
        "model.image_size=64",
        "model.width_mult=0.0625",
        f"train.epochs={epochs}",
        "train.batch_size=4",
        "train.amp=fp32",  # the same arithmetic on every CI host, with or without bf16 instructions
        "train.eval_every_epochs=1",
        "train.log_every_steps=1",
        "train.ema_decay=null",
        "eval.coco_metrics=false",
        "eval.batch_size=6",
    ]


def tiny_config(root: Path, **kwargs) -> Config:
    return load_config(REPO / "configs" / "demo.yaml", tiny_overrides(root, **kwargs))


def state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
