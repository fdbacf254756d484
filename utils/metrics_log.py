"""Per-run metrics: a JSONL file (one record per logged step or evaluation) and TensorBoard when installed."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from utils.atomic_file import atomic_file

logger = logging.getLogger(__name__)

# The scalars each record type sends to TensorBoard, as "<type>/<key>".
_TENSORBOARD_KEYS = {
    "train": ("loss", "localization", "confidence", "lr", "images_per_s"),
    "eval": ("voc07_map", "voc12_map"),
}


class MetricsLogger:
    """Appends to `<run_dir>/metrics.jsonl`.

    A new run starts the file anew. A resumed run keeps the records up to its checkpoint and drops the
    ones the interrupted run logged after it, which the resumed run logs again: the file then reads as
    that of a run never interrupted. TensorBoard is told the same through its purge step, which hides the
    earlier events from the checkpoint's step on; the records kept at that step are written again. (A purge
    from the next step would keep an evaluation logged after a checkpoint taken on the epoch's last step,
    which the resumed run logs a second time at the same step.)

    Args:
        run_dir: the run's folder.
        enabled: False on the processes that do not log (all but rank 0).
        resumed_at: ``(epochs done, global step)`` of the checkpoint a run resumed from, or None.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resumed_at: tuple[int, int] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        kept = self._start_file(resumed_at)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            logger.info("tensorboard not installed: metrics go to %s only", self.path)
        else:
            purge_step = 0 if resumed_at is None else resumed_at[1]
            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)
            for record in kept:  # none for a new run
                if record.get("step") == purge_step:
                    self._to_tensorboard(record)

    def _start_file(self, resumed_at: tuple[int, int] | None) -> list[dict[str, Any]]:
        """Rewrite the file with the records a resumed run keeps (none for a new run); returns them."""
        kept_lines: list[str] = []
        kept: list[dict[str, Any]] = []
        if not self.path.exists():
            return kept
        if resumed_at is not None:
            epochs_done, step = resumed_at
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a process killed while writing it
                    continue
                # An evaluation is logged with the number of epochs done; one logged after a checkpoint
                # taken on the epoch's last step (step equal, epochs done one short) comes again.
                after = record.get("step", 0) > step or (
                    record.get("type") == "eval" and record.get("epoch", 0) > epochs_done
                )
                if not after:
                    kept_lines.append(line)
                    kept.append(record)
        else:
            logger.info("%s: a new run starts the file anew", self.path)
        with atomic_file(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(f"{line}\n" for line in kept_lines)
        return kept

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        keys = _TENSORBOARD_KEYS.get(record.get("type"), ())
        if self._writer is None or not all(isinstance(record.get(key), (int, float)) for key in (*keys, "step")):
            return
        for key in keys:
            self._writer.add_scalar(f"{record['type']}/{key}", record[key], record["step"])

    def _append(self, record: dict[str, Any]) -> None:
        record["time"] = round(time.time(), 3)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def log_train(self, stats: Any) -> None:
        if not self.enabled:
            return
        record = {
            "type": "train", "epoch": stats.epoch, "step": stats.step, "loss": stats.loss,
            "localization": stats.localization, "confidence": stats.confidence, "lr": stats.lr,
            "images_per_s": round(stats.images_per_s, 2),
        }  # fmt: skip
        self._append(record)
        self._to_tensorboard(record)

    def log_eval(self, *, epoch: int, step: int, result: Any) -> None:
        if not self.enabled:
            return
        voc = result.voc
        record = {"type": "eval", "epoch": epoch, "step": step, "voc07_map": voc.voc07_map, "voc12_map": voc.voc12_map}
        self._append(record)
        self._to_tensorboard(record)
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
