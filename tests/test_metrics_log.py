"""MetricsLogger: metrics.jsonl and TensorBoard events after a resume read as one uninterrupted run."""

from __future__ import annotations

import json
import sys
import types

from utils.metrics_log import MetricsLogger


class FakeSummaryWriter:
    """Records what MetricsLogger asks of TensorBoard, which need not be installed."""

    made: list[dict] = []

    def __init__(self, log_dir, purge_step=None):
        self.made.append({"log_dir": log_dir, "purge_step": purge_step})

    def close(self):
        pass


def test_tensorboard_purges_the_events_after_the_checkpoint(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.made.clear()
    MetricsLogger(tmp_path).close()
    MetricsLogger(tmp_path, resumed_at=(2, 300)).close()
    # A new run hides every earlier event in its folder; a resumed one those after its checkpoint's step.
    assert [w["purge_step"] for w in FakeSummaryWriter.made] == [0, 301]
    assert FakeSummaryWriter.made[0]["log_dir"] == str(tmp_path / "tensorboard")


def test_jsonl_keeps_records_up_to_the_checkpoint(tmp_path):
    records = [
        {"type": "train", "epoch": 1, "step": 3},
        {"type": "eval", "epoch": 1, "step": 3},
        {"type": "train", "epoch": 2, "step": 6},
        {"type": "eval", "epoch": 2, "step": 6},  # logged after a checkpoint taken on step 6, mid-epoch 2
        {"type": "train", "epoch": 3, "step": 7},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"type": "tra')  # killed mid-line
    MetricsLogger(tmp_path, resumed_at=(1, 6)).close()  # 1 epoch done, step 6
    assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
    MetricsLogger(tmp_path).close()  # a new run in this folder
    assert path.read_text() == ""
