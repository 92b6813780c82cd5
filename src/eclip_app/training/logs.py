"""What a run reports: samples/s and data wait (ThroughputWindow), and metrics.jsonl plus
TensorBoard event files and, when asked, Weights & Biases (RunLogs)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from eclip.atomic import atomic_write_text

from .config import SettingError

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

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (validation) out of the window."""
        self.start += seconds

    def read(self, world_size: int) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "samples_per_s": round(self.samples / elapsed, 2),
            "samples_per_s_per_device": round(self.samples / elapsed / world_size, 2),
            "data_wait_fraction": round(min(1.0, self.data_time / elapsed), 4),
        }
        self.reset()
        return out


REPORTERS = ("wandb",)


def wandb_module(report_to: list[str] | str):
    """The `wandb` module when `report_to` names it (None when not); a clear error for a name
    that is not a reporter, or when wandb is not installed."""
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)  # `--set report_to=wandb`
    unknown = [name for name in report_to if name not in REPORTERS]
    if unknown:
        raise SettingError(f"report_to: unknown {unknown}; choose from {list(REPORTERS)} (TensorBoard is the tensorboard field)")
    if "wandb" not in report_to:
        return None
    try:
        import wandb
    except ImportError:
        raise SettingError("report_to=['wandb'] needs the wandb package: pip install wandb (then wandb login)") from None
    return wandb


class RunLogs:
    """metrics.jsonl (always), TensorBoard event files (when installed and enabled) and Weights &
    Biases (when `report_to` names it), written by rank 0 only."""

    def __init__(self, out: Path, history: list[dict], enabled: bool, tensorboard: bool,
                 report_to: list[str] | str = (), run_config: dict | None = None):
        self.history = history
        self.enabled = enabled
        self.file = None
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        wandb = wandb_module(report_to)
        if wandb is not None:
            # one W&B run per run folder: a resumed run continues it (W&B ignores steps it has seen)
            id_file = out / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            atomic_write_text(id_file, run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "eclip"), name=out.name, id=run_id,
                                    resume="allow", dir=str(out), config=run_config)
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
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
