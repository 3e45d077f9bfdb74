"""The environment protocol every text environment speaks, plus episodes and vectorised rollouts.

    reset(seed) -> observation text
    step(action text) -> (observation text, reward, done, info)

Multi-step text environments, single-turn task sets and the YAML task files all implement it.
An environment with a fixed action set lists it in ``actions`` (discrete-action agents index it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class TextEnv(Protocol):
    actions: list[str] | None

    def reset(self, seed: int | None = None) -> str: ...

    def step(self, action: str) -> tuple[str, float, bool, dict]: ...


@dataclass
class Episode:
    """One episode: observations[t] is what the agent saw before actions[t]; len(observations) = len(actions) + 1."""

    observations: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    done: bool = False  # ended by the environment (not by the step cap)

    @property
    def total_reward(self) -> float:
        return float(sum(self.rewards))

    def __len__(self) -> int:
        return len(self.actions)

    def steps(self) -> list[dict]:
        """One dict per step (for tables and widgets)."""
        return [
            {"step": t, "observation": self.observations[t], "action": a, "reward": r, **self.infos[t]}
            for t, (a, r) in enumerate(zip(self.actions, self.rewards))
        ]


def rollout(env: TextEnv, policy: Callable[[str], str], seed: int | None = None, max_steps: int = 100) -> Episode:
    """Run one episode of ``env`` with ``policy(observation) -> action``."""
    ep = Episode(observations=[env.reset(seed)])
    for _ in range(max_steps):
        action = policy(ep.observations[-1])
        obs, reward, done, info = env.step(action)
        ep.actions.append(action)
        ep.rewards.append(float(reward))
        ep.infos.append(dict(info))
        ep.observations.append(obs)
        if done:
            ep.done = True
            break
    return ep


class LMPolicy:
    """A language model as a batched policy: ``policy(observations) -> actions``, one ``sample`` call per step.

    ``prompt(observation)`` builds the prompt (a string or chat messages) of one observation; ``sample_kwargs`` go
    to ``rlnlp.sample`` (``max_new_tokens``, ``temperature``, ``stop`` …). Driven by ``rollout_many``, each
    episode's keys and values are carried from one step to the next (``reuse_kv``, a ``TurnCache``): a step encodes
    only the prompt tokens its episode's previous prompt and action did not already cover — exact, whatever the
    prompt looks like. ``last`` holds the latest ``Samples`` (token ids and log-probs of the actions).
    """

    def __init__(self, model, tokenizer, prompt: Callable[[str], object] | None = None, *, reuse_kv: bool = True,
                 **sample_kwargs):
        from ..sampling import TurnCache

        if sample_kwargs.get("n", 1) != 1:
            raise ValueError("an LMPolicy takes one action per observation (n = 1)")
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt or (lambda observation: observation)
        self.sample_kwargs = sample_kwargs
        self.turn_cache = TurnCache() if reuse_kv else None
        self.last = None

    def __call__(self, observations: list[str], episode_ids: list | None = None) -> list[str]:
        from ..sampling import sample

        reuse = self.turn_cache is not None and episode_ids is not None
        self.last = sample(self.model, self.tokenizer, [self.prompt(o) for o in observations],
                           turn_cache=self.turn_cache if reuse else None, episode_ids=episode_ids if reuse else None,
                           **self.sample_kwargs)
        return self.last.texts

    def release(self, episode_ids: list) -> None:
        """Free the cached keys of episodes that ended."""
        if self.turn_cache is not None:
            self.turn_cache.release(episode_ids)


def rollout_many(envs: list[TextEnv], policy: Callable[[list[str]], list[str]], seeds: list[int | None] | None = None,
                 max_steps: int = 100) -> list[Episode]:
    """Run one episode in each env in lockstep: ``policy(observations) -> actions`` is called ONCE per
    step for every episode still running, so an LM policy samples them in one batch. An ``LMPolicy`` is also told
    which episode each observation belongs to (it keeps each episode's KV cache between steps) and which ended."""
    seeds = seeds if seeds is not None else [None] * len(envs)
    if len(seeds) != len(envs):
        raise ValueError(f"rollout_many got {len(seeds)} seeds for {len(envs)} environments")
    episodes = [Episode(observations=[env.reset(seed)]) for env, seed in zip(envs, seeds)]
    run = object()  # episode ids of this call: (run, i), never those of another rollout sharing the policy
    tracked = isinstance(policy, LMPolicy)
    try:
        for _ in range(max_steps):
            running = [i for i, ep in enumerate(episodes) if not ep.done]
            if not running:
                break
            observations = [episodes[i].observations[-1] for i in running]
            if tracked:
                actions = policy(observations, episode_ids=[(run, i) for i in running])
            else:
                actions = policy(observations)
            if len(actions) != len(running):
                raise ValueError(f"the policy returned {len(actions)} actions for {len(running)} observations")
            for i, action in zip(running, actions):
                obs, reward, done, info = envs[i].step(action)
                ep = episodes[i]
                ep.actions.append(action)
                ep.rewards.append(float(reward))
                ep.infos.append(dict(info))
                ep.observations.append(obs)
                ep.done = bool(done)
            if tracked:
                policy.release([(run, i) for i in running if episodes[i].done])
    finally:
        if tracked:
            policy.release([(run, i) for i in range(len(envs))])
    return episodes


class VecEnv:
    """N copies of an environment stepped together, auto-resetting finished ones (for batched rollouts).

    ``step`` returns the next observations (already reset where an episode ended); the ended
    episode's last observation is in ``info["final_observation"]``.
    """

    def __init__(self, make_env: Callable[[], TextEnv], n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"VecEnv needs n ≥ 1, got {n}")
        self.envs = [make_env() for _ in range(n)]
        self.actions = self.envs[0].actions
        self._next_seed = seed

    def __len__(self) -> int:
        return len(self.envs)

    def _seed(self) -> int:
        self._next_seed += 1
        return self._next_seed - 1

    def reset(self) -> list[str]:
        return [env.reset(self._seed()) for env in self.envs]

    def step(self, actions: list[str]) -> tuple[list[str], list[float], list[bool], list[dict]]:
        if len(actions) != len(self.envs):
            raise ValueError(f"VecEnv.step got {len(actions)} actions for {len(self.envs)} environments")
        obs, rewards, dones, infos = [], [], [], []
        for env, action in zip(self.envs, actions):
            o, r, d, info = env.step(action)
            info = dict(info)
            if d:
                info["final_observation"] = o
                o = env.reset(self._seed())
            obs.append(o)
            rewards.append(float(r))
            dones.append(bool(d))
            infos.append(info)
        return obs, rewards, dones, infos
