"""Selection only, the trainer: a fixed query, LoRA on the last layer's q/k, REINFORCE over sampled orders of the
cached pools, exact evaluation (``SelectionTrainer``)."""
from __future__ import annotations

import math
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import checkpoint
from ..losses import reinforce_loss
from ..tracking import progress
from .attention import last_layer_qk, reference, score_spread, uniform_entropy
from .cache import CacheBatch, PoolCache, build_cache, cached_scores, expected_entropy, order_logprobs, order_table
from .config import SPLIT_SEED, SelectionConfig
from .pools import make_pairs
from .selector import Selector


def selection_loss(chosen_logp: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """REINFORCE on the selections alone, a per-pool batch-mean baseline:

        A_{b,k} = R_{b,k} − 1/K Σ_k' R_{b,k'}        (K orders sampled on pool b)
        L = −mean_{b,k} A_{b,k} · Σ_s log p(key chosen at step s)

    chosen_logp: (B, K) log p of each sampled order (carries the gradient); rewards: (B, K) its episode reward."""
    adv = rewards - rewards.mean(1, keepdim=True)
    loss, stats = reinforce_loss(chosen_logp.flatten(), adv.flatten())
    stats.update({"losses/total": loss.item(), "stats/advantage_std": adv.std().item()})
    return loss, stats


class SelectionTrainer(Selector):
    """Selection only: LoRA on the last layer's q/k, a learnable temperature, cached pools, exact evaluation."""

    def __init__(self, cfg: SelectionConfig, pairs=None, root: str | Path | None = None, model=None, tokenizer=None):
        super().__init__(cfg, last_layer_qk, root=root, model=model, tokenizer=tokenizer)
        self.pairs = pairs if pairs is not None else make_pairs(cfg, self.tokenizer)
        self.table = order_table(cfg.pool_size)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.update_count = 0
        self.caches: dict[str, list[PoolCache]] = {}
        self.batches: dict[str, CacheBatch] = {}
        self.cache_seconds = 0.0

    # -------------------------------------------------------------- cache
    def build_caches(self, path: str | Path | None = None) -> None:
        """Cache the training and held-out pools once (``path``: load them from / save them to a file)."""
        if self.batches:
            return
        start = time.time()
        signature = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)
                     if f.name in ("dataset", "model", "pool_size", "key_tokens", "value_tokens", "query",
                                   "train_pools", "eval_pools", "eval_fraction", "seed")}
        if path is not None and Path(path).exists():
            saved = checkpoint.load(path, map_location=self.device)
            if saved.get("signature") == signature:
                self.caches = saved["caches"]
        if not self.caches:
            for split, n, seed in (("train", self.cfg.train_pools, self.cfg.seed),
                                   ("eval", self.cfg.eval_pools, SPLIT_SEED + 1)):
                pools = self.pairs.pools(n, split, seed)
                self.caches[split] = [build_cache(self.model, self.tokenizer, p, self.cfg.query, self.baseline_cache)
                                      for p in progress(pools, desc=f"score every order of {n} {split} pools")]
            if path is not None:
                checkpoint.save(path, signature=signature, caches=self.caches)  # atomic: a kill leaves no half file
        self.batches = {split: CacheBatch.stack(c) for split, c in self.caches.items()}
        self.cache_seconds = time.time() - start
        if self.initial_log_inv_temperature is None:
            with torch.no_grad(), reference(self.model):
                scores = cached_scores(self.model, self.batches["train"], self.heads)
                spread = score_spread(scores, self.table.remaining.to(self.device))
            self.start_temperature(self.cfg.selection_temperature or spread)

    @property
    def temperature(self) -> float:
        return math.exp(-self.log_inv_temperature.item())

    def order_logprobs(self, batch: CacheBatch, untrained: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, O) log p of every order and (B, P, N) per-prefix log-probs; ``untrained``: adapter off, initial T."""
        if untrained:
            with reference(self.model):
                return order_logprobs(cached_scores(self.model, batch, self.heads), 1 / self.untrained_temperature,
                                      self.table)
        return order_logprobs(cached_scores(self.model, batch, self.heads), self.log_inv_temperature.exp(), self.table)

    # -------------------------------------------------------------- training
    def update(self) -> dict:
        """Sample K orders per training pool from the selector, look their rewards up, one REINFORCE step."""
        start = time.time()
        batch = self.batches["train"]
        if self.cfg.pools_per_update and self.cfg.pools_per_update < len(batch):
            pick = torch.randperm(len(batch), generator=self.generator)[: self.cfg.pools_per_update]
            batch = batch.select(pick.to(self.device))
        order_logp, step_logp = self.order_logprobs(batch)  # (B, O), (B, P, N)
        chosen = torch.multinomial(order_logp.detach().exp().cpu(), self.cfg.orders_per_pool, replacement=True,
                                   generator=self.generator).to(self.device)  # (B, K): whole orders = step by step
        rewards = batch.episode_rewards.gather(1, chosen)
        loss, stats = selection_loss(order_logp.gather(1, chosen), rewards)
        grad_norm = self.optimizer_step(loss)
        stats.update({"charts/sampled_reward": rewards.mean().item(),
                      "stats/selection_entropy": expected_entropy(order_logp.detach(), step_logp.detach(),
                                                                  self.table).mean().item(),
                      "stats/uniform_entropy": uniform_entropy(self.cfg.pool_size),
                      "stats/temperature": self.temperature,
                      "stats/grad_norm": grad_norm, "time/update_s": time.time() - start})
        return stats

    @torch.no_grad()
    def expected(self, split: str = "eval", untrained: bool = False) -> dict[str, torch.Tensor]:
        """Exact per-pool expected episode reward (B,) and selection entropy (B,) of the selector."""
        batch = self.batches[split]
        order_logp, step_logp = self.order_logprobs(batch, untrained)
        return {"reward": (order_logp.exp() * batch.episode_rewards).sum(-1).cpu(),
                "entropy": expected_entropy(order_logp, step_logp, self.table).cpu()}

    def curve_point(self) -> dict:
        out = {}
        for split in ("train", "eval"):
            e = self.expected(split)
            out[f"charts/{split}_expected_reward"] = e["reward"].mean().item()
            out[f"stats/{split}_selection_entropy"] = e["entropy"].mean().item()
        return out

    def train(self, updates: int | None = None, resume: bool = False,
              cache_path: str | Path | None = None) -> pd.DataFrame:
        """Cache the pools (if not yet), then train until ``updates`` (default cfg.updates) updates in total."""
        total = updates if updates is not None else self.cfg.updates
        if resume:
            self.load()
        self.build_caches(cache_path)
        if not self.tracker.rows:
            self.tracker.log(0, {**self.curve_point(), "stats/uniform_entropy": uniform_entropy(self.cfg.pool_size),
                                 "stats/temperature": self.temperature})
        for _ in progress(range(self.update_count, total), desc=f"selection {self.cfg.dataset}"):
            stats = self.update()
            self.update_count += 1
            if self.update_count % self.cfg.eval_every == 0 or self.update_count == total:
                stats.update(self.curve_point())
            self.tracker.log(self.update_count, stats)
            if self.checkpoint_due(self.update_count, total):
                self.save()
        return self.tracker.df

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> pd.DataFrame:
        """One row per (pool, selector), all exact: ``policy`` (trained) and ``untrained`` selectors (expected reward
        over every order), ``random`` order (the mean over orders), ``document`` order, ``best`` order (the ceiling).
        ``entropy``: the selection entropy (random: uniform; document and best: 0)."""
        self.build_caches()
        R = self.batches[split].episode_rewards.cpu()  # (B, O)
        trained, untrained = self.expected(split), self.expected(split, untrained=True)
        columns = {"policy": (trained["reward"], trained["entropy"]),
                   "untrained": (untrained["reward"], untrained["entropy"]),
                   "random": (R.mean(1), torch.full((len(R),), uniform_entropy(self.cfg.pool_size))),
                   "document": (R[:, 0], torch.zeros(len(R))), "best": (R.max(1).values, torch.zeros(len(R)))}
        names = [c.pool.name for c in self.caches[split]]
        return pd.DataFrame([{"pool": i, "name": names[i], "selector": sel, "reward": float(r[i]),
                              "entropy": float(h[i])}
                             for sel, (r, h) in columns.items() for i in range(len(R))])

    @torch.no_grad()
    def path_probs(self, split: str, pool: int, order=None, untrained: bool = False) -> np.ndarray:
        """(N−1, N) selection probabilities at each step after the prefix order[:s] (default: document order)."""
        order = list(range(self.cfg.pool_size)) if order is None else list(order)
        _, step_logp = self.order_logprobs(self.batches[split].select([pool]), untrained)
        rows = [self.table.prefix_index(order[:s]) for s in range(self.cfg.pool_size - 1)]
        return step_logp[0, rows].exp().cpu().numpy()

    @torch.no_grad()
    def first_step_probs(self, split: str = "eval", untrained: bool = False) -> np.ndarray:
        """(B, N) probability of each key (document position) at the first step, for every pool of the split."""
        _, step_logp = self.order_logprobs(self.batches[split], untrained)
        return step_logp[:, self.table.prefix_index(())].exp().cpu().numpy()

    # -------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        """Checkpoint (atomic): adapter, optimizer, temperature, metrics, update count, every RNG and the order
        sampler."""
        return self.save_state(self.update_count, generator=self.generator.get_state())

    def load(self) -> int:
        """Restore the last checkpoint (if any); return the update training continues from."""
        state = self.load_state("update")
        if state is not None:
            self.update_count = state["completed"]
            self.generator.set_state(state["generator"])
        return self.update_count
