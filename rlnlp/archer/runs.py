"""What a run leaves behind (``Run``) and its checkpoints: save, read, load and restore for ``--resume``."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import checkpoint
from ..envs.base import Episode
from ..models import load_policy
from ..tracking import Tracker
from .config import ArcherConfig, RunFolderError
from .critic import Critic


@dataclass
class Run:
    """What a training run leaves behind (the notebook reads these)."""

    name: str
    algo: str
    cfg: ArcherConfig
    tracker: Tracker
    model: object
    tokenizer: object
    env: object
    critic: Critic | None = None
    episodes: list[Episode] = field(default_factory=list)
    env_steps: int = 0
    grad_steps: int = 0
    policy_samples: int = 0  # utterances sampled in all (ArCHer also samples fresh a′, a″ that no env sees)
    wall_s: float = 0.0

    @property
    def df(self):
        return self.tracker.df


def save_checkpoint(run: Run, label: str, opt, progress_state: dict, complete: bool = False) -> Path:
    """runs/NAME/checkpoints/LABEL/{actor/ (LoRA adapter), state.pt} and runs/NAME/run.json.

    state.pt holds what ``--resume`` needs to continue exactly: the actor's optimiser, the critic
    (online, target, optimiser), the replay buffer, the environments mid-episode, the loop's
    counters and every RNG (Python, NumPy, torch and every CUDA device: ``rlnlp.checkpoint``). Written to a
    temporary folder and renamed, so a kill mid-save leaves the previous checkpoint intact.
    """
    root = run.tracker.dir / "checkpoints"
    out, tmp = root / label, root / f".{label}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.model.save_pretrained(tmp / "actor")
    state = {"opt": opt.state_dict(), "rng": checkpoint.rng_state(), "progress": progress_state,
             "critic": run.critic.state_dict() if run.critic is not None else None,
             "tracker_rows": run.tracker.rows, "env_steps": run.env_steps, "grad_steps": run.grad_steps,
             "policy_samples": run.policy_samples, "episodes": run.episodes, "wall_s": run.wall_s}
    checkpoint.save(tmp / "state.pt", **state)
    old = root / f".{label}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    with checkpoint.atomic_path(run.tracker.dir / "run.json") as meta:
        meta.write_text(json.dumps({"algo": run.algo, "env_steps": run.env_steps, "grad_steps": run.grad_steps,
                                    "complete": complete, "config": asdict(run.cfg)}, indent=2))
    return out


def _checkpoint_dir(exp_path: Path, label: str) -> Path:
    read_run(exp_path)
    ckpt = exp_path / "checkpoints" / label
    if not (ckpt / "actor").exists():
        have = (sorted(p.name for p in (exp_path / "checkpoints").glob("[!.]*"))
                if (exp_path / "checkpoints").exists() else [])
        raise RunFolderError(f"{exp_path}: no checkpoint {label!r} (checkpoints here: {', '.join(have) or 'none'})")
    return ckpt


def read_run(exp_path: str | Path) -> tuple[str, ArcherConfig, dict]:
    """(algo, config, run.json) of a run folder."""
    exp_path = Path(exp_path)
    if not exp_path.is_dir():
        raise RunFolderError(f"{exp_path}: no such run folder")
    if not (exp_path / "run.json").exists():
        raise RunFolderError(f"{exp_path}: not a run folder (no run.json; train writes one)")
    meta = json.loads((exp_path / "run.json").read_text())
    known = {f.name for f in fields(ArcherConfig)}
    return meta["algo"], ArcherConfig(**{k: v for k, v in meta["config"].items() if k in known}), meta


def load_checkpoint(exp_path: str | Path, label: str = "latest"):
    """(model with the trained adapter, tokenizer, cfg) from a run folder."""
    from peft import PeftModel

    exp_path = Path(exp_path)
    ckpt = _checkpoint_dir(exp_path, label)
    _, cfg, _ = read_run(exp_path)
    model, tokenizer = load_policy(cfg.policy_model)
    model = PeftModel.from_pretrained(model, ckpt / "actor", is_trainable=True)
    return model, tokenizer, cfg


def _restore(run: Run, opt, exp_dir: Path) -> dict:
    """Load the latest checkpoint of ``exp_dir`` into a freshly set-up run; return the loop's progress state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = _checkpoint_dir(exp_dir, "latest")
    weights = ckpt / "actor" / "adapter_model.safetensors"
    set_peft_model_state_dict(run.model, load_file(str(weights)))
    state = checkpoint.load(ckpt / "state.pt")
    opt.load_state_dict(state["opt"])
    if run.critic is not None:
        run.critic.load_state_dict(state["critic"])
    run.tracker.rows = state["tracker_rows"]
    run.env_steps, run.grad_steps = state["env_steps"], state["grad_steps"]
    run.policy_samples, run.episodes, run.wall_s = state["policy_samples"], state["episodes"], state["wall_s"]
    checkpoint.set_rng_state(state["rng"])
    return state["progress"]
