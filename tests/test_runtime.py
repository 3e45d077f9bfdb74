import platform
from dataclasses import dataclass

import pytest
import torch

from rlnlp import runtime


@dataclass
class Cfg:
    steps: int = 1
    lr: float = 0.1

    @classmethod
    def smoke(cls):
        return cls(steps=2)

    @classmethod
    def cpu(cls):
        return cls(steps=200)

    @classmethod
    def full(cls):
        return cls(steps=2000)


@dataclass
class NoCpu:
    steps: int = 1

    @classmethod
    def smoke(cls):
        return cls()


def test_profile_follows_env_and_cuda(monkeypatch):
    monkeypatch.delenv("RLNLP_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.profile() == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.profile() == "cpu"  # a laptop gets the learning profile, not the mechanics check
    monkeypatch.setenv("RLNLP_PROFILE", "full")
    assert runtime.profile() == "full"
    monkeypatch.setenv("RLNLP_PROFILE", "smoke")
    assert runtime.profile() == "smoke"


def test_bad_profile_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RLNLP_PROFILE", "fast")
    with pytest.raises(ValueError, match="RLNLP_PROFILE"):
        runtime.profile()


def test_pick_uses_the_profile_preset_and_rejects_unknown_fields(monkeypatch):
    monkeypatch.setenv("RLNLP_PROFILE", "smoke")
    assert runtime.pick(Cfg).steps == 2
    assert runtime.pick(Cfg, "full").steps == 2000
    assert runtime.pick(Cfg, "cpu").steps == 200
    with pytest.raises(TypeError, match="no .cpu"):
        runtime.pick(NoCpu, "cpu")
    assert runtime.pick(Cfg, lr=0.5).lr == 0.5
    with pytest.raises(TypeError, match="no field"):
        runtime.pick(Cfg, learning_rate=0.5)


def test_seed_everything_makes_torch_reproducible():
    runtime.seed_everything(3)
    a = torch.randn(4)
    runtime.seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_banner_reports_profile_and_expected_time(capsys, monkeypatch):
    monkeypatch.setenv("RLNLP_PROFILE", "smoke")
    info = runtime.banner("00 tour", seed=1, expected={"smoke": "1 min", "full": "10 s"})
    out = capsys.readouterr().out
    assert info["profile"] == "smoke" and "1 min" in out and "00 tour" in out


# --- precision: bf16 autocast where the CPU computes bf16 natively, fp32 elsewhere ----------------------------------

@pytest.fixture
def fresh_detection(monkeypatch):
    """Forget the once-per-process answer of ``cpu_native_bf16`` and any RLNLP_DTYPE, for this test only."""
    monkeypatch.setattr(runtime, "_NATIVE_BF16", None)
    monkeypatch.delenv("RLNLP_DTYPE", raising=False)
    monkeypatch.delenv("RLNLP_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_cpu_without_native_bf16_computes_in_fp32(fresh_detection, monkeypatch):
    # mutation seen to fail: cpu_native_bf16 returning True whatever the flags say
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"fpu", "sse2", "avx2", "avx512f"})
    assert runtime.precision() == ("fp32", "the CPU has none of avx512_bf16, amx_bf16")
    with runtime.autocast():
        assert not torch.is_autocast_enabled("cpu")
    info = runtime.banner("t")
    assert info["compute"].startswith("fp32") and info["dtype"] == "float32"


def test_a_cpu_with_bf16_flags_autocasts_and_keeps_fp32_weights(fresh_detection, monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert runtime.precision() == ("bf16", "the CPU has amx_bf16")
    layer = torch.nn.Linear(8, 4)
    with runtime.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32 and runtime.dtype() == torch.float32  # master weights stay fp32


def test_without_cpu_flags_a_timed_matmul_decides_once(fresh_detection, monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: None)  # macOS, Windows
    calls = []
    monkeypatch.setattr(runtime, "_bf16_matmul_is_faster", lambda: calls.append(1) or False)
    assert runtime.precision()[0] == "fp32" and runtime.precision()[0] == "fp32"
    assert calls == [1]  # timed once per process, then cached
    monkeypatch.setattr(runtime, "_NATIVE_BF16", None)
    monkeypatch.setattr(runtime, "_bf16_matmul_is_faster", lambda: True)
    assert runtime.precision()[0] == "bf16"


def test_rlnlp_dtype_overrides_and_a_bad_value_names_the_choices(fresh_detection, monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setenv("RLNLP_DTYPE", "FP32")
    assert runtime.precision() == ("fp32", "set by RLNLP_DTYPE")
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: set())
    monkeypatch.setenv("RLNLP_DTYPE", "bf16")
    assert runtime.precision()[0] == "bf16"
    monkeypatch.setenv("RLNLP_DTYPE", "fp16")
    with pytest.raises(ValueError) as err:
        runtime.precision()
    assert "\n" not in str(err.value) and "fp32, bf16" in str(err.value) and "'fp16'" in str(err.value)


_ALLOCATOR = """
import ctypes, torch
import rlnlp.runtime as runtime
class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo
x = torch.empty(6_000_000)  # 24 MB: a decoding step's logits at batch ~120
held = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(runtime.MALLOC, "|", held.hblkhd, freed.hblkhd, held.arena, freed.arena)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is glibc's")
def test_a_freed_large_tensor_stays_in_the_heap_for_reuse():
    """Under glibc's defaults a fresh process serves a 24 MB tensor from its own memory mapping and unmaps it when
    the tensor is freed, so the next one faults in fresh pages; with the setting it comes from the heap and the heap
    keeps the memory after the free (``mallinfo2``: bytes in mappings, bytes in the heap)."""
    import os
    import subprocess
    import sys

    seen = {}
    for mode in ("default", ""):
        env = {**os.environ, "RLNLP_MALLOC": mode}
        out = subprocess.run([sys.executable, "-c", _ALLOCATOR], env=env, capture_output=True, text=True, check=True)
        what, numbers = out.stdout.strip().rsplit("|", 1)
        seen[mode] = (what.strip(), *map(int, numbers.split()))
    size = 6_000_000 * 4
    name, held_mapped, freed_mapped, held_heap, freed_heap = seen["default"]
    assert name.startswith("glibc defaults") and held_mapped - freed_mapped >= size, seen  # unmapped at the free
    name, held_mapped, freed_mapped, held_heap, freed_heap = seen[""]
    assert name.startswith("freed blocks"), seen
    assert held_mapped == freed_mapped and held_heap >= size and freed_heap == held_heap, seen  # heap, kept
