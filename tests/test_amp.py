"""train.amp resolution: explicit precisions, `auto` on CUDA and CPUs, and the CPU bf16 probe."""

import pytest
import torch

import utils.engine as engine
from utils.config import ConfigError

CPU = torch.device("cpu")


def test_explicit_precisions_on_cpu():
    assert engine.resolve_amp_dtype("fp32", CPU) is None
    assert engine.resolve_amp_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="train.amp.*fp16 autocast is CUDA-only"):
        engine.resolve_amp_dtype("fp16", CPU)


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    assert engine.resolve_amp_dtype("auto", CPU) is expected


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_native_bf16_probe(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert engine.cpu_has_native_bf16() is expected


def test_native_bf16_probe_without_the_torch_helpers(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert engine.cpu_has_native_bf16() is False
