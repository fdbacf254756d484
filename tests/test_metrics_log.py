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
        self.scalars = []
        self.made.append({"log_dir": log_dir, "purge_step": purge_step, "scalars": self.scalars})

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        pass


def fake_tensorboard(monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.made.clear()


def test_tensorboard_purges_the_events_from_the_checkpoint_on(tmp_path, monkeypatch):
    fake_tensorboard(monkeypatch)
    MetricsLogger(tmp_path).close()
    MetricsLogger(tmp_path, resumed_at=(2, 300)).close()
    # A new run hides every earlier event in its folder; a resumed one those from its checkpoint's step on.
    assert [w["purge_step"] for w in FakeSummaryWriter.made] == [0, 300]
    assert FakeSummaryWriter.made[0]["log_dir"] == str(tmp_path / "tensorboard")


def test_tensorboard_gets_the_records_kept_at_the_checkpoints_step_again(tmp_path, monkeypatch):
    # Step 3 is epoch 1's last. A checkpoint taken on it by train.save_every_steps came before epoch 1's
    # evaluation, which the resumed run logs again; one taken at the epoch's end came after it.
    fake_tensorboard(monkeypatch)
    train_3 = {"type": "train", "epoch": 1, "step": 3, "loss": 2.5, "localization": 1.0, "confidence": 1.5,
               "lr": 0.01, "images_per_s": 9.0}
    eval_3 = {"type": "eval", "epoch": 1, "step": 3, "voc07_map": 0.25, "voc12_map": 0.2}
    train_2 = dict(train_3, step=2)
    lines = "".join(json.dumps(r) + "\n" for r in (train_2, train_3, eval_3))
    path = tmp_path / "metrics.jsonl"
    for epochs_done, replayed in ((0, [train_3]), (1, [train_3, eval_3])):
        path.write_text(lines)
        MetricsLogger(tmp_path, resumed_at=(epochs_done, 3)).close()
        expected = [(f"{r['type']}/{key}", r[key], 3) for r in replayed for key in r if key not in ("type", "epoch", "step")]
        assert FakeSummaryWriter.made[-1]["scalars"] == expected
        assert FakeSummaryWriter.made[-1]["purge_step"] == 3


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
