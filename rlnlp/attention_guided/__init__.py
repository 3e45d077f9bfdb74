"""Attention-guided RL: the model orders its own curriculum (notebooks/03_attention_guided_curriculum).

A document is cut into key → value pairs. At each step the policy LM writes a short query; its OWN
last attention layer scores the remaining keys (query projection of the query tokens against the
key projection of each key); one pair is drawn and appended to the context. The frozen reference
model then says how much easier each value became to predict thanks to everything chosen before:

    r_i = mean_t log p_ref(value_i | context_<i, query_i, key_i) − mean_t log p_ref(value_i | key_i)

Two ways to train it, one selector:

* **the full loop** (``AttentionGuidedConfig``, ``AttentionGuidedTrainer``; the full profile's method):
  the policy samples its queries, LoRA on q/k/v of every layer, REINFORCE on the query tokens and
  the selections, k3 KL to the reference on the query tokens. Every rollout samples text and runs
  the reference, so an update costs seconds on a GPU and minutes on a CPU.
* **selection only** (``SelectionConfig``, ``SelectionTrainer``; the smoke and cpu profiles): a
  FIXED query, LoRA on the last layer's q/k only. Then nothing below the last layer's q/k
  projections depends on the adapter, so per pool we cache once the inputs of those projections
  (query tokens after every prefix of every order, each key alone) and the reference's reward of
  EVERY order (pools of 3–4 pairs: 6 or 24 orders, enumerable — the best order, the ceiling, is
  known). After the cache an update is a few small matmuls, and the expected reward of a selector
  on a pool is exact (a sum over orders), not sampled.

    python -m rlnlp.attention_guided --dataset {wikipedia,twenty_questions} --batch-size 4 --episodes 1000 \
        [--checkpoint-every N] [--resume] [--mode selection]

Design choices that differ from the original:
* the selector averages the head scores, then takes ONE softmax with a temperature set from the
  measured score spread (and learnable); the original averaged one softmax per head, which at the
  measured spread (~0.4 across keys) was nearly uniform (entropy 2.046 vs 2.079 at 8 keys);
* selection samples from that distribution AS probabilities, per batch row;
* the reward uses the frozen reference and includes the current query and key in the context;
* the query log-probs are scored WITH their context; the KL is to the frozen reference (non-zero);
* the B rollouts of one episode share ONE pool, so the batch-mean baseline compares orders of the
  same material (and key embeddings and reward baselines are computed once per pool);
* no rotary embedding on q/k before the dot product (see ``selection_scores``).

The package, by role: ``config`` (the two configs), ``pools`` (pair pools and their text), ``attention`` (the model's
own attention as a selector), ``reward``, ``selector`` (what both trainers share: LoRA, heads, temperature,
optimizer, checkpoints), ``loop`` (the full loop), ``cache`` and ``selection`` (selection only), ``analysis`` (paired
comparisons), ``figures``, ``cli``. Every public name is importable from ``rlnlp.attention_guided``.
"""
from __future__ import annotations

from .analysis import describe_difference, gap_share, paired, per_pool
from .attention import (
    Heads,
    capture_projection_inputs,
    capture_projections,
    entropy,
    fixed_query_scores,
    heads_of,
    key_embeddings,
    last_layer_qk,
    lora_targets,
    project,
    query_pass,
    reference,
    score_spread,
    selection_probs,
    selection_scores,
    uniform_entropy,
)
from .cache import (
    CacheBatch,
    OrderTable,
    PoolCache,
    build_cache,
    cached_scores,
    expected_entropy,
    order_logprobs,
    order_table,
)
from .cli import main
from .config import DATASETS, FIXED_QUERY, MODES, SELECTORS, SPLIT_SEED, AttentionGuidedConfig, SelectionConfig
from .figures import (
    first_pick_figure,
    first_pick_heatmaps,
    first_pick_rates,
    order_rewards_figure,
    path_heatmaps,
    selection_heatmap,
    selection_heatmaps,
    step_figure,
)
from .loop import AttentionGuidedTrainer, Rollout, attention_guided_loss, rollout
from .pools import INSTRUCTIONS, Pool, TwentyQuestionsPairs, WikipediaPairs, context_of, make_pairs, pair_prompt
from .reward import key_only_logprob, step_rewards, value_logprob
from .selection import SelectionTrainer, selection_loss
from .selector import Selector

__all__ = [
    "DATASETS", "FIXED_QUERY", "INSTRUCTIONS", "MODES", "SELECTORS", "SPLIT_SEED",
    "AttentionGuidedConfig", "SelectionConfig",
    "Pool", "TwentyQuestionsPairs", "WikipediaPairs", "context_of", "make_pairs", "pair_prompt",
    "Heads", "capture_projection_inputs", "capture_projections", "entropy", "fixed_query_scores", "heads_of",
    "key_embeddings", "last_layer_qk", "lora_targets", "project", "query_pass", "reference", "score_spread",
    "selection_probs", "selection_scores", "uniform_entropy",
    "key_only_logprob", "step_rewards", "value_logprob",
    "Selector",
    "AttentionGuidedTrainer", "Rollout", "attention_guided_loss", "rollout",
    "CacheBatch", "OrderTable", "PoolCache", "build_cache", "cached_scores", "expected_entropy", "order_logprobs",
    "order_table",
    "SelectionTrainer", "selection_loss",
    "describe_difference", "gap_share", "paired", "per_pool",
    "first_pick_figure", "first_pick_heatmaps", "first_pick_rates", "order_rewards_figure", "path_heatmaps",
    "selection_heatmap", "selection_heatmaps", "step_figure",
    "main",
]
