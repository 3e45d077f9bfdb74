"""The actor: the LM + LoRA that proposes one move per step, and episodes of it on the grid."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..envs.gridworld import GridWorld, State
from ..sampling import Samples, render_prompts, sample
from .chains import ChainOutcome, MCSample, episode_samples, execute_chain
from .config import LactChainConfig
from .text import ANSWER_PREFIX, ParsedChain, actor_prompt, move_complete, parse_move


@dataclass
class Proposals:
    """Chains proposed for ``states`` (row i answers states[prompt_index[i]]), with the sampled tokens."""

    states: list[State]
    samples: Samples
    parsed: list[ParsedChain]

    @property
    def texts(self) -> list[str]:
        return [ANSWER_PREFIX + t for t in self.samples.texts]

    def row_states(self) -> list[State]:
        """The state each row answers."""
        return [self.states[int(i)] for i in self.samples.prompt_index]


class Actor:
    """The LM actor: renders prompts (assistant turn opened with ``ANSWER_PREFIX``), samples, parses."""

    def __init__(self, model, tokenizer, env: GridWorld, cfg: LactChainConfig):
        self.model, self.tokenizer, self.env, self.cfg = model, tokenizer, env, cfg

    def prompts(self, states: list[State]) -> list[str]:
        chats = render_prompts(self.tokenizer, [actor_prompt(self.env, s) for s in states])
        return [c + ANSWER_PREFIX for c in chats]

    def propose(self, states: list[State], n: int = 1, temperature: float | None = None,
                seed: int | None = None) -> Proposals:
        """``n`` chains per state, one batched ``sample`` call; each answer stops at the end of its move."""
        samples = sample(self.model, self.tokenizer, self.prompts(states), n=n, chat=False,
                         max_new_tokens=self.cfg.max_new_tokens,
                         temperature=self.cfg.temperature if temperature is None else temperature,
                         stop=move_complete, batch_size=self.cfg.batch_size, seed=seed)
        parsed = [parse_move(t, self.cfg.max_cells) for t in samples.texts]
        return Proposals(list(states), samples, parsed)


@dataclass
class ActorEpisodes:
    """LM-actor episodes run in lockstep: per episode its chain outcomes and parse flags; ``first`` holds the
    proposals of the first chain (row i = episode i), which the preference stage reuses."""

    starts: list[State]
    outcomes: list[list[ChainOutcome]]
    parsed_ok: list[list[bool]]
    first: Proposals

    def samples(self, gamma: float) -> list[MCSample]:
        """Monte-Carlo targets at every chain start (bootstrapped by ``fit_critic`` where the budget cut)."""
        return [s for ep in self.outcomes for s in episode_samples(ep, gamma)]

    def success(self) -> np.ndarray:
        return np.array([ep[-1].done for ep in self.outcomes], dtype=float)


def run_episodes(actor: Actor, starts: list[State], max_chains: int, temperature: float | None = None,
                 seed: int | None = None) -> ActorEpisodes:
    """One episode per entry of ``starts``, ≤ ``max_chains`` chains each; each chain step is ONE batched
    generation over the running episodes (repeated states share their prompt's prefill)."""
    outcomes = [[] for _ in starts]
    ok = [[] for _ in starts]
    current = list(starts)
    running = list(range(len(starts)))
    first = None
    for t in range(max_chains):
        if not running:
            break
        props = actor.propose([current[i] for i in running], temperature=temperature,
                              seed=None if seed is None else seed + t)
        if t == 0:
            first = props
        still = []
        for i, p in zip(running, props.parsed):
            o = execute_chain(actor.env, current[i], p.moves, actor.cfg.empty_chain_penalty)
            outcomes[i].append(o)
            ok[i].append(p.ok)
            current[i] = o.next_state
            if not o.done:
                still.append(i)
        running = still
    return ActorEpisodes(list(starts), outcomes, ok, first)
