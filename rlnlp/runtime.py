"""Profiles, device and dtype, seeding, and the banner every notebook prints first.

Three profiles share one code path (``RLNLP_PROFILE`` forces one):

* ``smoke`` — mechanics: tiny budgets, at most 4 minutes per notebook on a 2-core CPU, still
  asserting something real. ``make test`` and CI force it.
* ``cpu``   — the learning profile and the default without CUDA: real learning on a 2-core CPU,
  at most 10 minutes per notebook, every headline number with its interval (``make learn``).
* ``full``  — the default with CUDA: each notebook's training fits ~90 s on one H100/H200, so all
  six notebooks run in one command of at most 9 minutes (``make full``).
"""
from __future__ import annotations

import os
import platform
import random
from dataclasses import fields, is_dataclass

import numpy as np
import torch

PROFILES = ("smoke", "cpu", "full")
PROFILE_PURPOSE = {
    "smoke": "mechanics check (tiny budgets; ≤ 4 min per notebook on a 2-core CPU)",
    "cpu": "learning on a CPU (≤ 10 min per notebook on 2 cores; headline numbers with intervals)",
    "full": "learning at scale (≤ 90 s of training per notebook on one H100/H200)",
}


def apply_thread_setting() -> int:
    """Honour ``$RLNLP_THREADS`` (torch intra-op threads). On a CPU shared by several jobs, 1 avoids
    OpenMP oversubscription (measured here: one sampling call took 119 s with 2 threads vs 9 s with 1
    while other jobs ran). Returns the thread count in force."""
    n = os.environ.get("RLNLP_THREADS")
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


apply_thread_setting()


def profile(override: str | None = None) -> str:
    """The active profile: ``override``, else ``$RLNLP_PROFILE``, else ``full`` with CUDA, ``cpu`` without."""
    name = override or os.environ.get("RLNLP_PROFILE") or ("full" if torch.cuda.is_available() else "cpu")
    name = name.strip().lower()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r} (from RLNLP_PROFILE or the argument): use one of {PROFILES}")
    return name


def device() -> torch.device:
    """``cuda`` when available, else ``cpu`` (override with ``$RLNLP_DEVICE``)."""
    name = os.environ.get("RLNLP_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype(dev: torch.device | None = None) -> torch.dtype:
    """bf16 on a GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow and imprecise)."""
    dev = dev or device()
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick(config_cls, prof: str | None = None, **overrides):
    """Instantiate ``config_cls.smoke()``, ``.cpu()`` or ``.full()`` for the active profile, then apply overrides."""
    prof = profile(prof)
    preset = getattr(config_cls, prof, None)
    if preset is None:
        raise TypeError(f"{config_cls.__name__} has no .{prof}() preset (profiles: {', '.join(PROFILES)})")
    cfg = preset()
    if overrides:
        if not is_dataclass(cfg):
            raise TypeError(f"{config_cls.__name__} is not a dataclass")
        names = {f.name for f in fields(cfg)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"{config_cls.__name__} has no field(s) {sorted(unknown)}")
        for key, value in overrides.items():
            setattr(cfg, key, value)
    return cfg


def banner(title: str, prof: str | None = None, seed: int | None = None, expected: dict | None = None) -> dict:
    """Print (and return) one line per fact a reader needs before running a notebook.

    ``expected`` maps a profile name to its expected wall time, e.g. ``{"smoke": "3 min on a 2-core CPU"}``.
    """
    prof = profile(prof)
    dev = device()
    info = {
        "notebook": title,
        "profile": prof,
        "profile means": PROFILE_PURPOSE[prof],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": str(dtype(dev)).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if seed is not None:
        info["seed"] = seed
    info["expected run time"] = (expected or {}).get(prof, "not measured for this profile")
    info["other profiles"] = ", ".join(f"RLNLP_PROFILE={p}" for p in PROFILES if p != prof)
    width = max(len(k) for k in info)
    print("=" * 72)
    for key, value in info.items():
        print(f"{key:>{width}} : {value}")
    print("=" * 72)
    return info
