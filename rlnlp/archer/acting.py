"""Acting: one utterance per row (``act``), N environments in lockstep (``Collector``), whole episodes
(``play``) and the replay buffer of utterance-level transitions."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from ..envs.base import Episode
from ..sampling import Samples, sample
from .config import ArcherConfig


@dataclass
class Utterances:
    """Utterances for a batch of observations; ``samples`` holds the tokens and log-probs the actor trains on."""

    observations: list[str]
    texts: list[str]
    samples: Samples
    # PPO's π_old per token (``actor.old_logprobs``), set before the first update
    old_logprobs: torch.Tensor | None = None


def act(model, tokenizer, env, observations: list[str], cfg: ArcherConfig, n: int = 1, seed: int | None = None,
        temperature: float | None = None) -> Utterances:
    """Sample ``n`` utterances per observation with the rules of ``env``.

    The sampler stops a row at ``env.split(utterance)``, EOS or the token cap. recurve also ends an
    utterance where ``done_fn(observation + utterance)`` first holds; that needs each row's own
    observation, which the sampler's stop function does not see, so the row is cut here at that
    token (exact: tokens before the cut were sampled exactly as they would have been). In raw-text
    environments (``env.chat`` False) an utterance ended by EOS carries the end-of-turn marker.
    """
    chat = getattr(env, "chat", True)
    split = getattr(env, "split", lambda u: "\n" in u)
    ends = getattr(env, "ends_episode", None)
    # identical observations go to the sampler side by side (then back in order): they share one prefill,
    # and the working-tree sampler (2026-12-02) mismatched rows of a prompt repeated non-contiguously
    first = {}
    order = sorted(range(len(observations)), key=lambda i: (first.setdefault(observations[i], i), i))
    s = sample(model, tokenizer, [observations[i] for i in order], n=n, max_new_tokens=cfg.utterance_tokens,
               temperature=cfg.temperature if temperature is None else temperature, stop=split, chat=chat,
               batch_size=128, seed=seed)
    if order != sorted(order):
        back = [0] * len(order)
        for pos, i in enumerate(order):
            back[i] = pos
        s = s.select([back[i] * n + j for i in range(len(observations)) for j in range(n)])
    rows = [o for o in observations for _ in range(n)]
    eos = {tokenizer.eos_token_id}
    texts = []
    for i, obs in enumerate(rows):
        length = int(s.completion_mask[i].sum())
        ids = s.completion_ids[i, :length].tolist()
        if ends is not None:
            cut = next((t for t in range(1, length + 1)
                        if ends(obs, tokenizer.decode(ids[:t], skip_special_tokens=True))), length)
            if cut < length:
                s.completion_mask[i, cut:] = 0
                s.logprobs[i, cut:] = 0.0
                s.completion_ids[i, cut:] = tokenizer.pad_token_id
                s.stopped[i] = True
                length, ids = cut, ids[:cut]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not chat and ids and ids[-1] in eos:
            text += tokenizer.eos_token
        texts.append(text)
    s.texts = texts
    return Utterances(observations=rows, texts=texts, samples=s)


def _rows(u: Utterances, sl) -> Utterances:
    """Some utterance rows (a slice or a list of indices) with their tokens."""
    idx = list(range(len(u.texts)))[sl] if isinstance(sl, slice) else list(sl)
    return Utterances([u.observations[i] for i in idx], [u.texts[i] for i in idx], u.samples.select(idx))


def _concat(parts: list[Utterances], pad_id: int = 0) -> Utterances:
    """Stack utterance rows from different sampling calls."""
    samples = Samples.concat([p.samples for p in parts], pad_id)
    return Utterances([o for p in parts for o in p.observations], [t for p in parts for t in p.texts], samples)


# ---- transitions and the replay buffer ------------------------------------------------------------

@dataclass
class Transition:
    observation: str
    action: str
    reward: float
    next_observation: str
    done: bool


class ReplayBuffer:
    """A FIFO list of transitions with uniform sampling."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity, self.items, self.rng = capacity, [], random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, transitions: list[Transition]) -> None:
        self.items.extend(transitions)
        del self.items[: max(0, len(self.items) - self.capacity)]

    def sample(self, k: int) -> list[Transition]:
        return [self.items[self.rng.randrange(len(self.items))] for _ in range(k)]

    def state_dict(self) -> dict:
        return {"items": [asdict(t) for t in self.items], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.items = [Transition(**t) for t in state["items"]]
        self.rng.setstate(state["rng"])


class Collector:
    """N environments stepped together with auto-reset; keeps each running episode and every finished one.

    With ``ranks`` (several processes, ``rlnlp.distributed.Ranks``) this process holds its block of the
    ``n × ranks.world`` environments, and reset seeds are handed out in the order one process would use: the
    environments' global order, every process's resets counted at each step; ``env_steps`` counts every process."""

    def __init__(self, make, n: int, seed: int, ranks=None):
        self.envs = [make() for _ in range(n)]
        self.ranks = ranks if ranks is not None and ranks.world > 1 else None
        self.next_seed = seed + (self.ranks.rank * n if self.ranks else 0)
        self.obs = [self._reset(e) for e in self.envs]
        if self.ranks:
            self.next_seed = seed + self.ranks.world * n
        self.running = [Episode(observations=[o]) for o in self.obs]
        self.finished: list[Episode] = []
        self.env_steps = 0

    def _reset(self, env) -> str:
        self.next_seed += 1
        return env.reset(self.next_seed - 1)

    def step(self, actions: list[str]) -> list[Transition]:
        out, ended = [], []
        for i, (env, a) in enumerate(zip(self.envs, actions)):
            obs2, r, done, info = env.step(a)
            ep = self.running[i]
            ep.actions.append(a)
            ep.rewards.append(float(r))
            ep.infos.append(info)
            ep.observations.append(obs2)
            out.append(Transition(self.obs[i], a, float(r), obs2, bool(done)))
            if done:
                ep.done = True
                self.finished.append(ep)
                if self.ranks:  # reset below, once every process's count of ended episodes is known
                    ended.append(i)
                else:
                    obs2 = self._reset(env)
                    self.running[i] = Episode(observations=[obs2])
            self.obs[i] = obs2
        if self.ranks:
            counts = self.ranks.counts(len(ended))
            total, self.next_seed = self.next_seed + sum(counts), self.next_seed + sum(counts[: self.ranks.rank])
            for i in ended:
                self.obs[i] = self._reset(self.envs[i])
                self.running[i] = Episode(observations=[self.obs[i]])
            self.next_seed = total
        self.env_steps += len(actions) * (self.ranks.world if self.ranks else 1)
        return out

    def state_dict(self) -> dict:
        return {"envs": [e.state() for e in self.envs], "next_seed": self.next_seed, "obs": list(self.obs),
                "running": self.running, "finished": self.finished, "env_steps": self.env_steps}

    def load_state_dict(self, state: dict) -> None:
        for env, s in zip(self.envs, state["envs"]):
            env.load_state(s)
        self.next_seed, self.obs, self.env_steps = state["next_seed"], state["obs"], state["env_steps"]
        self.running, self.finished = state["running"], state["finished"]


def play(model, tokenizer, cfg: ArcherConfig, make, starts: list[int], seed: int, temperature: float | None = None,
         keep_rows: bool = False) -> tuple[list[Episode], list[int], list[list[Utterances]]]:
    """Play one episode from each start (``env.reset(start)``) in lockstep, batched per turn.

    Returns the episodes, each episode's end in environment samples counted from this call's
    first step (the lockstep order: every live episode steps once per turn), and with
    ``keep_rows`` each episode's utterance rows (tokens and sampling log-probs, for training).
    """
    envs = [make() for _ in starts]
    eps = [Episode(observations=[e.reset(s)]) for e, s in zip(envs, starts)]
    rows: list[list[Utterances]] = [[] for _ in starts]
    ends, used = [0] * len(starts), 0
    for turn in range(cfg.max_turns):
        live = [i for i, ep in enumerate(eps) if not ep.done]
        if not live:
            break
        u = act(model, tokenizer, envs[0], [eps[i].observations[-1] for i in live], cfg, seed=seed + 31 * turn,
                temperature=temperature)
        for k, (i, a) in enumerate(zip(live, u.texts)):
            obs, r, done, info = envs[i].step(a)
            used += 1
            ep = eps[i]
            ep.actions.append(a)
            ep.rewards.append(float(r))
            ep.infos.append(info)
            ep.observations.append(obs)
            ep.done = done
            ends[i] = used
            if keep_rows:
                rows[i].append(_rows(u, [k]))
    return eps, ends, rows
