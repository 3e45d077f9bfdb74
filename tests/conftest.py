import pytest
import torch


@pytest.fixture(scope="session")
def policy():
    """The embedded SmolLM2 (converted once, cached), shared by every test: read-only — a test that
    attaches LoRA or trains loads its own copy (LoRA freezes the base weights in place)."""
    from rlnlp.models import load_policy

    torch.manual_seed(0)
    return load_policy(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def encoder():
    from rlnlp.models import TextEncoder

    return TextEncoder(device="cpu")


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path, monkeypatch):
    """Runs and figures written by tests go to a temporary folder, never into the repository."""
    monkeypatch.setenv("RLNLP_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("RLNLP_VIS", str(tmp_path / "vis"))
    if "RLNLP_PROFILE" not in __import__("os").environ:  # unit tests run the smoke presets unless told otherwise
        monkeypatch.setenv("RLNLP_PROFILE", "smoke")
    if "RLNLP_DTYPE" not in __import__("os").environ:  # and in fp32: they compare against exact references
        monkeypatch.setenv("RLNLP_DTYPE", "fp32")
