"""The CUDA paths of train.py and eval.py on tiny data. Skipped on machines without a GPU."""

import json
import os

import pytest
import torch

import eval as eval_module
import train as train_module
from tests.test_train import crash_at_loss_call, run_dir
from tests.train_helpers import REPO, tiny_overrides
from utils.checkpoint import load_checkpoint
from utils.config import load_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEMO = str(REPO / "configs" / "demo.yaml")


def cuda_overrides(root, name, amp, epochs=2):
    return tiny_overrides(root, name=name, epochs=epochs) + ["train.device=cuda", f"train.amp={amp}"]


def test_fp16_run_resumes_on_cuda_with_its_grad_scaler(tmp_path, monkeypatch):
    straight = load_config(DEMO, cuda_overrides(tmp_path, "straight", "fp16"))
    train_module.train(straight, show_progress=False)
    expected = load_checkpoint(os.path.join(run_dir(straight), "last.pt"))

    crashed = load_config(DEMO, cuda_overrides(tmp_path, "crashed", "fp16"))
    crash_at_loss_call(monkeypatch, call_number=5)  # during epoch 2; last.pt holds epoch 1
    with pytest.raises(RuntimeError, match="power cut"):
        train_module.train(crashed, show_progress=False)
    monkeypatch.undo()
    last = os.path.join(run_dir(crashed), "last.pt")
    assert load_checkpoint(last)["scaler"]["scale"] > 0  # fp16 runs carry a live GradScaler

    assert train_module.main(["--resume", last, "--no-progress"]) == 0
    resumed = load_checkpoint(last)
    assert (resumed["epoch"], resumed["global_step"]) == (2, 6)
    assert resumed["scaler"]["scale"] == expected["scaler"]["scale"]
    for key, value in expected["model"].items():
        # cuDNN may pick different (non-deterministic) kernels in the two processes: close, not identical.
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_bf16_channels_last_compiled_run_and_eval_print_the_same_map(tmp_path, capsys):
    overrides = cuda_overrides(tmp_path, "compiled", "bf16", epochs=1) + ["train.compile=true"]
    cfg = load_config(DEMO, overrides)
    summary = train_module.train(cfg, show_progress=False)
    best = os.path.join(run_dir(cfg), "best.pt")
    out = tmp_path / "eval"
    code = eval_module.main(["--config", DEMO, "--checkpoint", best, "--output-dir", str(out), "--no-coco",
                             *overrides])  # fmt: skip
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["voc07_map"] == pytest.approx(
        summary["best_voc07_map"], abs=1e-6
    )
