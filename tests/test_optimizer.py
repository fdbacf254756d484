"""build_optimizer: parameter groups, the optimizer of the config, and the multi-tensor update on the CPU."""

from pathlib import Path

import pytest
import torch

from utils.builders import build_model, build_optimizer
from utils.config import load_config

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _model_and_config(*overrides: str):
    cfg = load_config(CONFIG, ["model.width_mult=0.0625", "model.image_size=64", *overrides])
    torch.manual_seed(0)
    return build_model(cfg.model, len(cfg.data.classes), cfg.loss.classification), cfg


def test_weights_are_decayed_and_biases_and_norms_are_not():
    model, cfg = _model_and_config("train.weight_decay=0.01")
    optimizer = build_optimizer(cfg.train, model)
    decayed, not_decayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and not_decayed["weight_decay"] == 0.0
    conv = model.base[0]
    norm = model.base[1]
    assert any(p is conv.weight for p in decayed["params"])
    assert any(p is conv.bias for p in not_decayed["params"])
    assert any(p is norm.weight for p in not_decayed["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(("name", "kind"), [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizer_of_the_config_with_the_multi_tensor_update(name, kind):
    model, cfg = _model_and_config(f"train.optimizer={name}", "train.lr=0.01")
    optimizer = build_optimizer(cfg.train, model)
    assert type(optimizer) is kind
    assert optimizer.defaults["foreach"] is True
    assert all(group["lr"] == 0.01 for group in optimizer.param_groups)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_multi_tensor_update_gives_the_per_parameter_loop_weights_bit_for_bit(name):
    # The faster update must not change what a seeded CPU run learns.
    model_a, cfg = _model_and_config(f"train.optimizer={name}", "train.weight_decay=0.01")
    model_b, _ = _model_and_config(f"train.optimizer={name}", "train.weight_decay=0.01")
    optimizer_a = build_optimizer(cfg.train, model_a)
    optimizer_b = build_optimizer(cfg.train, model_b)
    for group in optimizer_b.param_groups:
        group["foreach"] = False
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
            grad = torch.randn(pa.shape, generator=generator)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        optimizer_a.step()
        optimizer_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(model_a.parameters(), _model_and_config()[0].parameters(),
                                                           strict=True))
