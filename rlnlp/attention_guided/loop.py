"""The full loop: the policy samples a query, its own attention picks a pair, REINFORCE on queries and selections
with a k3 KL to the reference on the query tokens (``AttentionGuidedTrainer``)."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..losses import reinforce_loss
from ..models import completion_logprobs, kl_k3, masked_mean
from ..sampling import sample
from ..tracking import progress
from .attention import (
    Heads,
    _device,
    entropy,
    fixed_query_scores,
    key_embeddings,
    lora_targets,
    query_pass,
    reference,
    score_spread,
    selection_probs,
    uniform_entropy,
)
from .config import FIXED_QUERY, SELECTORS, SPLIT_SEED, AttentionGuidedConfig
from .pools import Pool, make_pairs, pair_prompt
from .reward import step_rewards
from .selector import Selector


@dataclass
class Rollout:
    """Rows of one episode on one pool; each row has a selector ("policy", "random", "document").

    chosen: (rows, S) key index per step;  step_rewards: (rows, S);  probs: (B, S, N) selection
    probabilities of the policy rows (0 for keys already used). The remaining fields feed the loss
    (policy rows only; they carry gradients when the rollout was made with grad=True)."""

    pool: Pool
    selectors: list[str]
    queries: list[list[str]]
    chosen: torch.Tensor
    step_rewards: torch.Tensor
    probs: torch.Tensor
    contexts: list[str]
    entropy: torch.Tensor  # (B, S) selection entropy in nats
    seq_logp: torch.Tensor | None = None  # (B,) Σ_steps [Σ_t log π(query_t) + log p(chosen key)]
    selection_logp: torch.Tensor | None = None  # (B,) Σ_steps log p(chosen key): the selection term of seq_logp
    query_logp: torch.Tensor | None = None  # (B, S·C) per query token
    ref_query_logp: torch.Tensor | None = None  # (B, S·C)
    query_mask: torch.Tensor | None = None  # (B, S·C)
    key_logp: torch.Tensor | None = None  # (B, S) log p(chosen key), detached

    @property
    def episode_reward(self) -> torch.Tensor:
        """(rows,) mean step reward."""
        return self.step_rewards.mean(1)

    def rows(self, selector: str) -> list[int]:
        return [i for i, s in enumerate(self.selectors) if s == selector]

    def steps(self, row: int = 0) -> list[dict]:
        """One dict per step of a row, for rlnlp.widgets.stepper and tables."""
        out = []
        for s in range(self.chosen.shape[1]):
            j = int(self.chosen[row, s])
            step = {"query": self.queries[row][s], "key": self.pool.keys[j], "value": self.pool.values[j],
                    "reward": float(self.step_rewards[row, s])}
            if self.selectors[row] == "policy":
                p = self.probs[self.rows("policy").index(row), s]
                step["selection probabilities"] = {self.pool.keys[i][:40]: float(p[i])
                                                   for i in range(len(p)) if p[i] > 0}
            out.append(step)
        return out


def rollout(model, tokenizer, pool: Pool, cfg: AttentionGuidedConfig, heads: Heads, selectors: list[str],
            grad: bool = False, baseline_cache: dict | None = None,
            temperature: float | torch.Tensor | None = None) -> Rollout:
    """Play one episode per row on ``pool``: query → attention over remaining keys → append the pair.

    ``temperature``: the selection temperature (a tensor carries the gradient of a learnable one);
    None = cfg.selection_temperature, or 1 when that is unset."""
    if temperature is None:
        temperature = cfg.selection_temperature or 1.0
    unknown = set(selectors) - set(SELECTORS)
    if unknown:
        raise ValueError(f"rollout: unknown selector(s) {sorted(unknown)}; use {SELECTORS}")
    dev = _device(model)
    R, N, S = len(selectors), len(pool), cfg.n_steps
    policy = [i for i, s in enumerate(selectors) if s == "policy"]
    pol = torch.tensor(policy, dtype=torch.long, device=dev)
    B = len(policy)
    remaining = torch.ones(R, N, dtype=torch.bool, device=dev)
    contexts = [pool.instruction] * R
    queries: list[list[str]] = [[] for _ in range(R)]
    chosen = torch.zeros(R, S, dtype=torch.long)
    probs_log, sel_entropy, key_logp = torch.zeros(B, S, N), torch.zeros(B, S), torch.zeros(B, S)
    reward_args = ([], [], [], [])  # contexts, queries, keys, values, step-major
    seq_logp = torch.zeros(B, device=dev)
    selection_logp = torch.zeros(B, device=dev)
    q_logps, ref_logps, q_masks = [], [], []
    with torch.set_grad_enabled(grad):
        k_emb = key_embeddings(model, tokenizer, pool.keys) if B else None  # (N, G·d), once per episode
    for s in range(S):
        smp = sample(model, tokenizer, [c + " Query:" for c in contexts], max_new_tokens=cfg.query_tokens,
                     temperature=cfg.query_temperature, top_p=cfg.top_p, chat=False)
        choice = torch.zeros(R, dtype=torch.long, device=dev)
        if B:
            batch = [x[pol] for x in (smp.prompt_ids, smp.prompt_mask, smp.completion_ids, smp.completion_mask)]
            with torch.set_grad_enabled(grad):
                q_logp, q_emb = query_pass(model, *batch)  # (B, C), (B, H·d)
                probs = selection_probs(q_emb, k_emb, remaining[pol], heads, temperature)  # (B, N)
            choice[pol] = torch.multinomial(probs.detach(), 1).squeeze(1)
            logp_key = torch.log(probs.gather(1, choice[pol, None]).squeeze(1).clamp_min(1e-30))  # (B,)
            seq_logp = seq_logp + q_logp.sum(1) + logp_key
            selection_logp = selection_logp + logp_key
            probs_log[:, s] = probs.detach().cpu()
            key_logp[:, s] = logp_key.detach().cpu()
            sel_entropy[:, s] = entropy(probs.detach()).cpu()
            if grad:
                with torch.no_grad(), reference(model):
                    ref_logps.append(completion_logprobs(model, *batch))
                q_logps.append(q_logp)
                q_masks.append(batch[3])
        for r, sel in enumerate(selectors):
            if sel == "random":
                choice[r] = torch.multinomial(remaining[r].float(), 1).squeeze()
            elif sel == "document":
                choice[r] = remaining[r].float().argmax()  # the first remaining pair
        for r in range(R):
            j = int(choice[r])
            query, key, value = smp.texts[r], pool.keys[j], pool.values[j]
            for lst, item in zip(reward_args, (contexts[r], query, key, value)):
                lst.append(item)
            contexts[r] = contexts[r] + pair_prompt(query, key) + f" {value}"
            queries[r].append(query)
            remaining[r, j] = False
            chosen[r, s] = j
    rewards = step_rewards(model, tokenizer, *reward_args, baseline_cache=baseline_cache).view(S, R).T.cpu()  # (R, S)
    out = Rollout(pool, list(selectors), queries, chosen, rewards, probs_log, contexts, sel_entropy, key_logp=key_logp)
    if grad and B:
        out.seq_logp, out.selection_logp = seq_logp, selection_logp
        out.query_logp, out.ref_query_logp, out.query_mask = (torch.cat(x, 1) for x in (q_logps, ref_logps, q_masks))
    return out


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def attention_guided_loss(ro: Rollout, kl_coef: float, training_percentile: float = 0.0) -> tuple[torch.Tensor, dict]:
    """REINFORCE with a batch-mean baseline on queries + selections, plus the k3 KL on the query tokens.

        A_b = R_b − mean_b' R_b'                      (R_b: episode reward of policy row b)
        L_pg = −mean_{b kept} A_b · Σ_steps [log π(query) + log p(chosen key)]
        L = L_pg + β · mean_tokens k3(π, π_ref)
    """
    if ro.seq_logp is None:
        raise ValueError("attention_guided_loss needs a rollout made with grad=True and at least one policy row")
    dev = ro.seq_logp.device
    R = ro.episode_reward[ro.rows("policy")].to(dev)  # (B,)
    adv = R - R.mean()
    keep = (R >= torch.quantile(R, training_percentile / 100) if training_percentile > 0
            else torch.ones_like(R, dtype=torch.bool))
    pg, stats = reinforce_loss(ro.seq_logp[keep], adv[keep])
    kl = masked_mean(kl_k3(ro.query_logp, ro.ref_query_logp), ro.query_mask)
    loss = pg + kl_coef * kl
    stats.update({"losses/kl": (kl_coef * kl).item(), "losses/total": loss.item(), "stats/kl": kl.item(),
                  "stats/query_logp": masked_mean(ro.query_logp.detach(), ro.query_mask).item(),
                  "stats/kept_rows": int(keep.sum())})
    return loss, stats


class AttentionGuidedTrainer(Selector):
    """The full loop: policy (LM + LoRA on q/k/v), pools, optimizer, tracker and checkpoints for one dataset."""

    def __init__(self, cfg: AttentionGuidedConfig, pairs=None, root: str | Path | None = None, model=None,
                 tokenizer=None):
        super().__init__(cfg, lora_targets, root=root, model=model, tokenizer=tokenizer)
        self.pairs = pairs if pairs is not None else make_pairs(cfg, self.tokenizer)
        self.rng = random.Random(cfg.seed)
        spread_rng = random.Random(cfg.seed + 1)
        self.start_temperature(cfg.selection_temperature
                               or self.measure_spread([self.pairs.pool(spread_rng, "train") for _ in range(4)]))
        self.episode = 0
        self.history: list[Rollout] = []  # detached training rollouts, for the notebook's plots

    @torch.no_grad()
    def measure_spread(self, pools: list[Pool]) -> float:
        """Mean spread (std over keys) of the untrained scores with the fixed query at the first step."""
        with reference(self.model):
            scores = torch.stack([fixed_query_scores(self.model, self.tokenizer, p, (), FIXED_QUERY, self.heads)
                                  for p in pools])
        return score_spread(scores, torch.ones_like(scores, dtype=torch.bool))

    @property
    def temperature(self) -> torch.Tensor:
        return torch.exp(-self.log_inv_temperature)

    @property
    def selectors(self) -> list[str]:
        c = self.cfg
        return ["policy"] * c.batch_size + ["random"] * c.baseline_rows + ["document"] * c.baseline_rows

    def rollout(self, pool: Pool, selectors: list[str] | None = None, grad: bool = False,
                untrained: bool = False) -> Rollout:
        """One episode; ``untrained=True`` plays it with the adapter off and the initial temperature (queries too)."""
        if untrained:
            with reference(self.model):
                return rollout(self.model, self.tokenizer, pool, self.cfg, self.heads, selectors or self.selectors,
                               baseline_cache=self.baseline_cache, temperature=self.untrained_temperature)
        return rollout(self.model, self.tokenizer, pool, self.cfg, self.heads, selectors or self.selectors, grad=grad,
                       baseline_cache=self.baseline_cache,
                       temperature=self.temperature if grad else self.temperature.item())

    def update(self) -> tuple[Rollout, dict]:
        """One episode on a fresh training pool, then one gradient step."""
        start = time.time()
        self.model.train()
        ro = self.rollout(self.pairs.pool(self.rng, "train"), grad=True)
        loss, stats = attention_guided_loss(ro, self.cfg.kl_coef, self.cfg.training_percentile)
        grad_norm = self.optimizer_step(loss)
        reward = ro.episode_reward
        with_choice = [s for s in range(self.cfg.n_steps) if len(ro.pool) - s >= 2]  # the last pair is forced
        stats.update({"charts/episode_reward": reward[ro.rows("policy")].mean().item(),
                      "stats/selection_entropy": ro.entropy[:, with_choice].mean().item(),
                      "stats/uniform_entropy": uniform_entropy(len(ro.pool), self.cfg.n_steps),
                      "stats/temperature": self.temperature.item(),
                      "stats/grad_norm": grad_norm, "time/episode_s": time.time() - start})
        for sel in ("random", "document"):
            if ro.rows(sel):
                stats[f"charts/{sel}_reward"] = reward[ro.rows(sel)].mean().item()
        ro.seq_logp = ro.selection_logp = ro.query_logp = ro.ref_query_logp = ro.query_mask = None  # drop the graph
        return ro, stats

    def train(self, episodes: int | None = None, resume: bool = False) -> pd.DataFrame:
        """Train until ``episodes`` (default cfg.episodes) episodes in total; checkpoint on the way."""
        total = episodes if episodes is not None else self.cfg.episodes
        if resume:
            self.load()
        for _ in progress(range(self.episode, total), desc=f"attention-guided {self.cfg.dataset}"):
            ro, stats = self.update()
            self.history.append(ro)
            self.tracker.log(self.episode, stats)
            self.episode += 1
            if self.checkpoint_due(self.episode, total):
                self.save()
        return self.tracker.df

    def save(self) -> Path:
        """Checkpoint (atomic): adapter, optimizer, temperature, metrics, episode, every RNG and the pool sampler."""
        return self.save_state(self.episode, pool_rng=self.rng.getstate())

    def load(self) -> int:
        """Restore the last checkpoint (if any); return the episode training continues from."""
        state = self.load_state("episode")
        if state is not None:
            self.episode = state["completed"]
            self.rng.setstate(state["pool_rng"])
        return self.episode

    def eval_pools(self, n: int) -> list[Pool]:
        """The same n distinct held-out pools every time (fixed seed)."""
        return self.pairs.pools(n, "eval", SPLIT_SEED + 1)

    @torch.no_grad()
    def evaluate(self, pools: list[Pool], rows: int | None = None) -> tuple[pd.DataFrame, list[Rollout]]:
        """Episode reward of every selector on each pool: one DataFrame row per (pool, selector, rollout).

        Selectors: the trained ``policy``, ``random`` and ``document`` order (both with the trained policy's
        queries: they isolate SELECTION), and ``untrained`` (adapter off, initial temperature: untrained queries
        AND selection, so the gain of the queries shows in policy − untrained)."""
        rows = rows or self.cfg.batch_size
        selectors = [s for s in SELECTORS for _ in range(rows)]
        records, rollouts = [], []
        self.model.eval()
        for i, pool in enumerate(progress(pools, desc="evaluate")):
            ro = self.rollout(pool, selectors)
            before = self.rollout(pool, ["policy"] * rows, untrained=True)
            rollouts.append(ro)
            records += [{"pool": i, "name": pool.name, "selector": s, "reward": float(r)}
                        for s, r in zip(selectors + ["untrained"] * rows,
                                        torch.cat([ro.episode_reward, before.episode_reward]))]
        return pd.DataFrame(records), rollouts


