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
