"""Headline results as rows: one function records them, the scoreboard prints them.

A notebook opens ``Results("01_alectors_encoder_ppo")`` and calls ``add(...)`` once per headline
number. Each call rewrites ``visualizations/results/<profile>/<notebook>.json`` with every row
this run has recorded, so the file always holds the latest complete run of that notebook. The
``cpu`` and ``full`` files are committed; ``smoke`` files are not (they check mechanics only).

A row says: which system, task and metric; the method's value and the baseline's (name and
value); their difference with its 95% interval and n (and what one unit is); whether higher is
better; the profile, device, wall time, date and git commit that produced it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import time
from pathlib import Path

from .runtime import device as active_device
from .runtime import profile as active_profile
from .stats import Interval

CLAIMS = ("learning", "comparison", "reference")
"""``learning``: trained vs untrained on the same units; ``comparison``: method vs another method
(e.g. ERL vs GRPO); ``reference``: a fixed baseline gap that shows the task has signal (no training)."""


def results_dir(prof: str | None = None) -> Path:
    """``visualizations/results/<profile>`` (``$RLNLP_VIS`` moves visualizations/)."""
    from .plots import visualizations_dir

    return visualizations_dir() / "results" / active_profile(prof)


def git_commit(root: Path | None = None) -> str:
    """The short commit of the repository this package lives in, ``+dirty`` when the tree has changes outside
    ``visualizations/`` (the figures and results files a running notebook writes are not what it ran from)."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)visualizations"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty and sha else "")


def device_name() -> str:
    import torch

    dev = active_device()
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    threads = torch.get_num_threads()
    return f"cpu ({os.cpu_count()} cores, {threads} thread{'s' if threads != 1 else ''})"


class Results:
    """The results rows of one notebook run. ``wall_s`` defaults to the time since this object was made."""

    def __init__(self, notebook: str, prof: str | None = None):
        self.notebook = notebook
        self.profile = active_profile(prof)
        self.start = time.time()
        self.rows: list[dict] = []
        self.path = results_dir(self.profile) / f"{notebook}.json"

    def add(self, *, system: str, task: str, metric: str, method: str, value: float, baseline: str,
            baseline_value: float, difference: Interval, unit: str, higher_is_better: bool = True,
            claim: str = "learning", wall_s: float | None = None, note: str = "") -> dict:
        """Record one headline result and rewrite this notebook's results file.

        difference: method − baseline over ``difference.n`` matched units, with its interval
                    (from ``rlnlp.stats``); unit: what one unit is ("start state", "held-out pool").
        """
        if claim not in CLAIMS:
            raise ValueError(f"claim must be one of {CLAIMS}, got {claim!r}")
        if not isinstance(difference, Interval):
            raise TypeError("difference must be an rlnlp.stats.Interval (paired_difference, wilson, bootstrap, ...)")
        row = {
            "notebook": self.notebook, "system": system, "task": task, "metric": metric,
            "method": method, "value": float(value), "baseline": baseline, "baseline_value": float(baseline_value),
            "difference": float(difference.estimate), "low": float(difference.low), "high": float(difference.high),
            "confidence": difference.confidence, "interval": difference.method, "n": int(difference.n), "unit": unit,
            "higher_is_better": bool(higher_is_better), "claim": claim,
            "verdict": difference.verdict(higher_is_better) if claim != "reference" else "—",
            "profile": self.profile, "device": device_name(),
            "wall_s": round(float(wall_s if wall_s is not None else time.time() - self.start), 1),
            "date": _dt.date.today().isoformat(), "commit": git_commit(), "note": note,
        }
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.rows, indent=1) + "\n")
        return row


def load_rows(prof: str | None = None, folder: str | os.PathLike | None = None) -> list[dict]:
    """Every row of every results file of a profile, ordered by notebook file name."""
    folder = Path(folder) if folder is not None else results_dir(prof)
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of result rows")
        rows.extend(data)
    return rows


VERDICTS = {
    "yes": "**better**: the interval lies wholly on the good side of zero",
    "worse": "**worse**: the interval lies wholly on the bad side of zero",
    "no": "**no difference shown**: the interval straddles zero",
    "—": "reference (nothing trained: how much signal the task has)",
}


class Findings(str):
    """Markdown text that Jupyter renders as markdown (and a script prints as plain text)."""

    def _repr_markdown_(self) -> str:
        return str(self)


def _signed(x: float) -> str:
    return f"{x:+.3g}"


def finding_line(r: dict) -> str:
    """One results row as a markdown bullet: what was compared, the difference with its interval and n, the verdict."""
    from .scoreboard import units

    arrow = "higher is better" if r.get("higher_is_better", True) else "lower is better"
    verdict = VERDICTS.get(r.get("verdict", "no"), r.get("verdict", ""))
    return (f"- {r['task']} — {r['metric']} ({arrow}): {r['method']} **{r['value']:.3g}** vs {r['baseline']} "
            f"{r['baseline_value']:.3g}; difference {_signed(r['difference'])} "
            f"[{_signed(r['low'])}, {_signed(r['high'])}] "
            f"({r.get('interval', '')} {round(100 * r.get('confidence', 0.95))}%, "
            f"{r['n']} {units(r['unit'], r['n'])}) → {verdict}")


def verdict_in_words(row: dict | None) -> str:
    """A results row's difference, interval and n, with its verdict in words ("not recorded" for None)."""
    if row is None:
        return "not recorded"
    words = {"yes": "better (interval above 0)", "worse": "worse (interval below 0)",
             "no": "no detectable difference (the interval straddles 0)",
             "—": "reference row (nothing trained)"}.get(row.get("verdict", "no"), row.get("verdict", ""))
    return f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}], n = {row['n']}: {words}"


def findings(notebook: str, profiles: tuple[str, ...] | list[str] | None = None) -> Findings:
    """The headline rows a notebook recorded, as markdown: one block per profile, one bullet per row.

    ``profiles`` defaults to the active profile, then ``cpu`` (the committed learning run) when the
    active one is another: a smoke run shows its own mechanics-only rows and the cpu rows that the
    notebook's text interprets. A profile with no rows for the notebook says so.
    """
    if profiles is None:
        active = active_profile()
        profiles = [active] + (["cpu"] if active != "cpu" else [])
    blocks = []
    for prof in profiles:
        rows = [r for r in load_rows(prof) if r.get("notebook") == notebook]
        if not rows:
            blocks.append(f"**{prof} profile**: no results recorded for `{notebook}` yet (run the notebook with "
                          f"`RLNLP_PROFILE={prof}`).")
            continue
        dates = sorted({r["date"] for r in rows})
        commits = sorted({r["commit"] for r in rows})
        devices = sorted({r["device"] for r in rows})
        wall = max(r["wall_s"] for r in rows) / 60
        note = " (tiny budgets: mechanics only, no learning claimed)" if prof == "smoke" else ""
        head = (f"**{prof} profile**{note}: {len(rows)} row{'s' if len(rows) != 1 else ''} recorded "
                f"{', '.join(dates)} on {', '.join(devices)} at {', '.join(commits)}, {wall:.1f} min into the run.")
        blocks.append("\n".join([head, ""] + [finding_line(r) for r in rows]))
    return Findings("\n\n".join(blocks))
