"""What both trainers share: the policy with its LoRA adapter, the attention geometry, the learnable selection
temperature, the optimizer, the tracker, and checkpoints that resume exactly.

The two trainers differ in what the adapter covers (q/k/v of every layer in the full loop, the last layer's q/k in
selection only) and in how an update is made; everything else about the selector is here, once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint
from ..models import attach_lora, load_policy
from ..tracking import Tracker
from .attention import _device, heads_of


class Selector:
    """The trainable selector: ``model`` (policy + LoRA on ``lora_targets_of(model)``), ``tokenizer``, ``heads``,
    ``log_inv_temperature`` (log 1/T, learnable when ``cfg.learn_temperature``), ``optimizer`` (Adam over both),
    ``tracker`` (metrics under runs/``cfg.name``) and ``checkpoint_path``.

    ``cfg`` needs: model, lora_r, lora_alpha, learn_temperature, lr, max_grad_norm, name."""

    def __init__(self, cfg, lora_targets_of: Callable[[torch.nn.Module], tuple[str, ...]],
                 root: str | Path | None = None, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_policy(cfg.model)
        # LoRA dropout 0: the key is sampled from the very forward pass whose log-prob gets the gradient
        self.model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0,
                                 target_modules=lora_targets_of(model))
        self.tokenizer = tokenizer
        self.heads = heads_of(model.config)
        self.device = _device(self.model)
        self.log_inv_temperature = torch.nn.Parameter(torch.zeros((), device=self.device),
                                                      requires_grad=cfg.learn_temperature)
        self.initial_log_inv_temperature: float | None = None  # set by start_temperature
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.params += [self.log_inv_temperature] if cfg.learn_temperature else []
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.tracker = Tracker(cfg.name, root=root, config=cfg)
        self.checkpoint_path = self.tracker.dir / "checkpoint.pt"
        self.baseline_cache: dict = {}  # (key, value) -> mean log p_ref(value | key): the reference never changes

    def start_temperature(self, temperature: float) -> None:
        """Set the initial selection temperature T (the untrained selector's) and the learnable one to it."""
        self.initial_log_inv_temperature = -math.log(temperature)
        with torch.no_grad():
            self.log_inv_temperature.fill_(self.initial_log_inv_temperature)

    @property
    def untrained_temperature(self) -> float:
        return math.exp(-self.initial_log_inv_temperature)

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Backward, clip the gradient norm to cfg.max_grad_norm, one Adam step; return the norm before clipping."""
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        return grad_norm.item()

    # -------------------------------------------------------------- checkpoints
    def checkpoint_due(self, completed: int, total: int) -> bool:
        """Save after every cfg.checkpoint_every episodes or updates (0 = only at the end), and at the end."""
        every = self.cfg.checkpoint_every
        return completed == total or (every > 0 and completed % every == 0)

    def save_state(self, completed: int, **extra) -> Path:
        """Write the adapter, optimizer, temperature, metrics, ``completed`` (episodes or updates so far), every
        global RNG and ``extra`` (a trainer's own generators) to ``checkpoint_path``, atomically."""
        from peft import get_peft_model_state_dict

        return checkpoint.save(self.checkpoint_path, adapter=get_peft_model_state_dict(self.model),
                               optimizer=self.optimizer.state_dict(),
                               log_inv_temperature=self.log_inv_temperature.detach().cpu(),
                               initial_log_inv_temperature=self.initial_log_inv_temperature, completed=completed,
                               metrics=self.tracker.rows, rng=checkpoint.rng_state(), **extra)

    def load_state(self, unit: str) -> dict | None:
        """Restore what :meth:`save_state` wrote and return it (None when there is no checkpoint yet: training starts
        at 0). ``unit`` names what ``completed`` counts, for the message."""
        from peft import set_peft_model_state_dict

        if not self.checkpoint_path.exists():
            print(f"--resume: no checkpoint at {self.checkpoint_path}; starting from {unit} 0")
            return None
        state = checkpoint.load(self.checkpoint_path)
        set_peft_model_state_dict(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.log_inv_temperature.copy_(state["log_inv_temperature"])
        self.initial_log_inv_temperature = state["initial_log_inv_temperature"]
        self.tracker.rows = list(state["metrics"])
        checkpoint.set_rng_state(state["rng"])
        print(f"resumed from {self.checkpoint_path} at {unit} {state['completed']}")
        return state
