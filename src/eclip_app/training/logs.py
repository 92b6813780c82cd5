"""What a run reports: samples/s and data wait (ThroughputWindow), and metrics.jsonl plus
TensorBoard event files (RunLogs)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from eclip.atomic import atomic_write_text

logger = logging.getLogger("eclip.train")


class ThroughputWindow:
    """Samples/s and the fraction of wall time spent waiting for data since the last read."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.samples, self.data_time = time.perf_counter(), 0, 0.0

    def add(self, samples: int, data_time: float) -> None:
        self.samples += samples
        self.data_time += data_time

    def read(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "samples_per_s": round(self.samples / elapsed, 2),
            "samples_per_s_per_device": round(self.samples / elapsed / world_size, 2),
            "data_wait_fraction": round(min(1.0, self.data_time / elapsed), 4),
        }
        self.reset()
        return out


class RunLogs:
    """metrics.jsonl (always) and TensorBoard event files (when installed and enabled), written
    by rank 0 only."""

    def __init__(self, out: Path, history: list[dict], enabled: bool, tensorboard: bool):
        self.history = history
        self.enabled = enabled
        self.file = None
        self.writer = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in history))
        self.file = path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the `scale` extra is not installed
                logger.warning("tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=history[-1]["step"] + 1 if history else None)

    def write(self, record: dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    tag = key.replace("loss_", "loss/", 1).replace("lr_", "lr/", 1)
                    self.writer.add_scalar(tag, value, record["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
