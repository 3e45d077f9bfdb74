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

import contextlib
import inspect
import os
import platform
import random
from dataclasses import fields, is_dataclass, replace

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

MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = 32 << 20, 1 << 30
"""glibc's allocator hands a freed block of more than 128 KB (its starting threshold, raised only as blocks are
freed) back to the kernel, and trims the heap above 128 KB of free space, so each new large tensor of the same size
starts on fresh pages that fault in one by one. Sampling allocates a batch's logits (B × 49,152 fp32: 12.6 MB at
batch 64) and their softmax temporaries at every decoding step. Measured 2026-12-07 (2-core AMD EPYC, torch 2.13, 2
threads, batch 64): ``torch.exp`` of those logits 10.9 ms under glibc's defaults, 1.8–2.6 ms with blocks up to 32
MB (its largest mmap threshold) served from the heap and up to 1 GB of free heap kept; a float64 cumulative sum of
them 18.5 vs 2.2 ms. The cost: a process keeps up to 1 GB of freed memory for reuse instead of returning it."""


def apply_malloc_setting() -> str:
    """Keep freed memory for reuse (``MALLOC_MMAP_THRESHOLD``, ``MALLOC_TRIM_THRESHOLD``) under glibc on Linux,
    through ``mallopt``; ``$RLNLP_MALLOC=default`` leaves the allocator as it is. Returns what is in force, for the
    banner."""
    if os.environ.get("RLNLP_MALLOC", "").strip().lower() == "default":
        return "glibc defaults (RLNLP_MALLOC=default)"
    if platform.system() != "Linux":
        return "the system's defaults"
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "the system's defaults (no libc.so.6)"
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl's mallopt does nothing
        return "the system's defaults (not glibc)"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
    ok = libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD) == 1 and \
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD) == 1
    return "freed blocks up to 32 MB kept for reuse" if ok else "glibc defaults (mallopt refused)"


MALLOC = apply_malloc_setting()


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
    """The dtype weights are loaded in: bf16 on a GPU that supports it, fp32 on a CPU. On a CPU the master weights,
    optimizer state, losses and advantages stay fp32 and the matmuls run in the ``compute`` dtype (``autocast``)."""
    dev = dev or device()
    if dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


PRECISIONS = ("fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (Linux ``/proc/cpuinfo``) of native bf16 dot products. Measured on a 2-core AMD EPYC with avx512_bf16,
torch 2.13, one process: a 576 → 1536 linear layer at 512 rows runs 2.8× faster in bf16 than in fp32, SmolLM2-135M
prefills 2.0× faster under bf16 autocast. A CPU without them emulates bf16 and runs slower than fp32."""


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where ``/proc/cpuinfo`` does not list them (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _bf16_matmul_is_faster() -> bool:
    """Time a 256 × 512 × 512 matmul in both dtypes (best of 5, ~20 ms): bf16 counts as native when it is ≥ 1.3×
    faster than fp32."""
    import time

    a, b = torch.randn(256, 512), torch.randn(512, 512)
    best = {}
    for dt in (torch.float32, torch.bfloat16):
        x, y = a.to(dt), b.to(dt)
        x @ y
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            x @ y
            runs.append(time.perf_counter() - t0)
        best[dt] = min(runs)
    return best[torch.float32] >= 1.3 * best[torch.bfloat16]


_NATIVE_BF16: tuple[bool, str] | None = None


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and how we know (checked once per process)."""
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        flags = _cpu_flags()
        if flags is not None:
            have = [f for f in BF16_CPU_FLAGS if f in flags]
            _NATIVE_BF16 = (True, f"the CPU has {'/'.join(have)}") if have else \
                (False, f"the CPU has none of {', '.join(BF16_CPU_FLAGS)}")
        else:
            fast = _bf16_matmul_is_faster()
            _NATIVE_BF16 = (fast, f"a timed bf16 matmul was {'' if fast else 'not '}≥ 1.3× faster than fp32")
    return _NATIVE_BF16


def precision(dev: torch.device | None = None) -> tuple[str, str]:
    """The compute precision, ``"bf16"`` or ``"fp32"``, and why: ``$RLNLP_DTYPE`` when set; on a CPU, bf16 where it
    is native (``cpu_native_bf16``), fp32 elsewhere; on a GPU, the weights' own dtype (``dtype``)."""
    name = os.environ.get("RLNLP_DTYPE", "").strip().lower()
    if name:
        if name not in PRECISIONS:
            raise ValueError(f"RLNLP_DTYPE={name!r} is not a precision: use one of {', '.join(PRECISIONS)}")
        return name, "set by RLNLP_DTYPE"
    dev = dev or device()
    if dev.type != "cpu":
        return ("bf16" if dtype(dev) == torch.bfloat16 else "fp32"), f"the weights' dtype on {dev.type}"
    native, why = cpu_native_bf16()
    return ("bf16" if native else "fp32"), why


def autocast(dev: torch.device | None = None):
    """The one precision context of the core: on a CPU whose ``precision`` is bf16, ``torch.autocast`` to bf16
    (matmuls, linear layers and attention in bf16; everything else, and every weight, stays fp32); elsewhere a no-op
    (a GPU runs in its weights' dtype). Log-softmax and everything after it are computed in fp32 by the callers."""
    dev = dev or device()
    if dev.type == "cpu" and precision(dev)[0] == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick(config_cls, prof: str | None = None, **overrides):
    """Instantiate ``config_cls.smoke()``, ``.cpu()`` or ``.full()`` for the active profile, then apply overrides.

    The config is built ONCE with the overrides in place, so its ``__post_init__`` checks the overridden values too
    (a bad one raises ValueError naming the field): a preset that takes keyword arguments gets them
    (``ERLConfig.cpu(**overrides)``: TRL's ``__post_init__`` derives fields and must not run twice), any other
    preset's config is rebuilt with ``dataclasses.replace``."""
    prof = profile(prof)
    preset = getattr(config_cls, prof, None)
    if preset is None:
        raise TypeError(f"{config_cls.__name__} has no .{prof}() preset (profiles: {', '.join(PROFILES)})")
    if not overrides:
        return preset()
    if not is_dataclass(config_cls):
        raise TypeError(f"{config_cls.__name__} is not a dataclass")
    unknown = set(overrides) - {f.name for f in fields(config_cls)}
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {sorted(unknown)}")
    takes_keywords = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(preset).parameters.values())
    return preset(**overrides) if takes_keywords else replace(preset(), **overrides)


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
        "compute": "{} ({})".format(*precision(dev)),
        "threads": torch.get_num_threads(),
        "allocator": MALLOC,
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
