"""Per-step metrics into a pandas DataFrame, written to ``runs/<name>/metrics.csv``; progress bars.

Metric keys are grouped CleanRL-style: ``charts/…`` (returns, success, rewards), ``losses/…``
(every loss term), ``stats/…`` (KL, entropy, gate fraction, …), ``time/…``.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import pandas as pd


def runs_dir() -> Path:
    """Root of run folders: ``$RLNLP_RUNS`` or ``runs/`` at the repository root."""
    return Path(os.environ.get("RLNLP_RUNS", Path(__file__).resolve().parent.parent / "runs"))


def progress(iterable=None, total=None, desc: str | None = None, **kwargs):
    """A tqdm progress bar (notebook widget in Jupyter, text elsewhere)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **kwargs)


class Tracker:
    """Collects ``log(step, **metrics)`` rows; ``.df`` is the DataFrame; every log rewrites metrics.csv.

    Keys may contain "/" (``charts/episode_return``); pass them as ``log(step, **{"charts/x": 1})``
    or as a dict: ``log(step, {"charts/x": 1})``.
    """

    def __init__(self, name: str, root: str | os.PathLike | None = None, config=None, tensorboard: bool = False):
        self.name = name
        self.dir = Path(root or runs_dir()) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.start = time.time()
        if config is not None:
            cfg = asdict(config) if is_dataclass(config) else dict(config)
            (self.dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.dir / "tb")
            except ImportError:  # optional dependency
                print("tensorboard is not installed; logging to CSV only (pip install tensorboard)")

    def log(self, step: int, metrics: dict | None = None, **kw) -> dict:
        row = {"step": int(step), "time/elapsed_s": round(time.time() - self.start, 3)}
        for key, value in {**(metrics or {}), **kw}.items():
            if hasattr(value, "item"):
                value = value.item()
            row[key] = value
            if self.writer is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.rows.append(row)
        self.df.to_csv(self.dir / "metrics.csv", index=False)
        return row

    @property
    def df(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def last(self, key: str, default=float("nan")):
        for row in reversed(self.rows):
            if key in row:
                return row[key]
        return default

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
