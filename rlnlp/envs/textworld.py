"""TextWorld games behind the shared reset/step protocol.

TextWorld (Microsoft) generates text adventures from a seed: rooms, objects, a quest, a score, and
for every state the list of **admissible commands** (what the game's parser would accept and act
on). It is the standard engine for text-game RL (DRRN, KG-A2C and their successors). This module
makes its games speak the protocol every rlnlp environment speaks::

    env = TextWorldEnv(games)                 # .z8 game files (a .json with the same name beside each)
    obs = env.reset(seed)                     # the objective and the first room; env.info has the menu
    obs, reward, done, info = env.step("go east")

* ``reward`` is the change in the game's score (TextWorld's intermediate reward), so an episode's
  return is its final score; ``info["score"]`` / ``info["max_score"]`` give the normalised score.
* ``info["admissible_commands"]`` lists the commands of the NEW state (sorted), ``info["won"]`` /
  ``info["lost"]`` the game's verdict, ``info["truncated"]`` an episode cut by the step cap.
* ``env.info`` always holds the info of the current state (``reset`` fills it too).

Games of one *family* (a ``tw-make`` challenge at fixed settings, e.g. ``tw-coin_collector --level 5``)
are generated from seeds on first use into ``$RLNLP_CACHE/textworld`` (default ``~/.cache/rlnlp``),
in-process through the same code path as ``tw-make`` (``GameFamily.command(seed)`` prints the
equivalent command line). :func:`split_games` gives disjoint training and HELD-OUT games of a family.
Any other game file works too: ``TextWorldEnv(["my_game.z8"])``.

TextWorld runs on Linux and macOS; where it is missing, :data:`AVAILABLE` is False and every entry
point raises :class:`TextWorldMissing` with one line saying so.

Command line (check a game, yours or a generated one, with the random-admissible-command policy)::

    python -m rlnlp.envs.textworld path/to/game.z8 --episodes 8
    python -m rlnlp.envs.textworld "tw-coin_collector --level 5" --seed 7
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
import shlex
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

AVAILABLE = importlib.util.find_spec("textworld") is not None
"""Whether TextWorld is installed (found without importing it: its import takes a second)."""

MISSING_MESSAGE = ("TextWorld is not installed on this platform (it runs on Linux and macOS): "
                   "`pip install 'textworld>=1.7,<1.8'` or `make install`")


class TextWorldMissing(RuntimeError):
    """The textworld package is not importable here; the message is one line saying so (in a notebook too:
    the cell shows that line, not a traceback, and Run All stops there)."""

    def _render_traceback_(self):
        return [str(self)]


class GameFileError(ValueError):
    """A game file is missing, corrupt, or lacks its .json; the message is one line naming the file."""


def require_textworld():
    """The textworld module (imported on first use); :class:`TextWorldMissing` (one line) where it is not installed."""
    if not AVAILABLE:
        raise TextWorldMissing(MISSING_MESSAGE)
    import textworld
    import textworld.challenges
    import textworld.generator

    return textworld


# ---------------------------------------------------------------------------------------------
# Game families: generated from seeds, cached
# ---------------------------------------------------------------------------------------------
class _Arguments(argparse.ArgumentParser):
    """An argument parser that raises (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise ValueError(message)


def textworld_cache() -> Path:
    """``$RLNLP_CACHE/textworld`` (default ``~/.cache/rlnlp/textworld``): generated games live here."""
    from ..models import cache_dir

    return cache_dir() / "textworld"


@dataclass(frozen=True)
class GameFamily:
    """A ``tw-make`` challenge at fixed settings; ``game(seed)`` is one game of it (generated once, cached).

    ``GameFamily("tw-coin_collector", ("--level", "5")).game(7)`` is the game
    ``tw-make tw-coin_collector --level 5 --seed 7`` writes.
    """

    challenge: str = "tw-coin_collector"
    """A tw-make challenge: tw-coin_collector, tw-treasure_hunter, tw-simple, tw-cooking."""
    settings: tuple[str, ...] = ("--level", "5")
    """The challenge's own tw-make options, e.g. ("--level", "5") or ("--rewards", "dense", "--goal", "brief")."""

    @classmethod
    def parse(cls, text: str) -> "GameFamily":
        """``"tw-coin_collector --level 5"`` (a tw-make command line without ``--seed``) → GameFamily."""
        parts = shlex.split(text)
        if parts and parts[0] == "tw-make":
            parts = parts[1:]
        if not parts:
            raise ValueError("empty game family: expected e.g. 'tw-coin_collector --level 5'")
        family = cls(parts[0], tuple(parts[1:]))
        family.parsed_settings()  # unknown challenge or bad settings: one line now, not at first use
        return family

    def parsed_settings(self) -> dict:
        textworld = require_textworld()
        if self.challenge not in textworld.challenges.CHALLENGES:
            raise ValueError(f"unknown TextWorld challenge {self.challenge!r}; "
                             f"available: {', '.join(sorted(textworld.challenges.CHALLENGES))}")
        _, _, add_arguments = textworld.challenges.CHALLENGES[self.challenge]
        parser = _Arguments(prog=self.challenge, add_help=False)
        add_arguments(parser)
        try:
            return vars(parser.parse_args(list(self.settings)))
        except ValueError as err:
            raise ValueError(f"{self.challenge} {' '.join(self.settings)}: {err}") from None

    @property
    def name(self) -> str:
        return " ".join([self.challenge, *self.settings])

    def command(self, seed: int) -> str:
        """The tw-make command line that writes the same game."""
        return f"tw-make {self.name} --seed {seed}"

    def folder(self) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", " ".join(self.settings)).strip("-")
        return textworld_cache() / (self.challenge + (f"_{slug}" if slug else ""))

    def game(self, seed: int) -> Path:
        """The game file of ``seed`` (``.z8``, with its ``.json`` beside it), generated on first use (~1 s)."""
        path = self.folder() / f"seed{seed}.z8"
        if path.exists() and path.with_suffix(".json").exists():
            return path
        settings = self.parsed_settings()
        textworld = require_textworld()
        _, make, _ = textworld.challenges.CHALLENGES[self.challenge]
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            options = textworld.GameOptions()
            options.seeds = seed
            options.path = str(Path(tmp) / path.name)
            options.file_ext = ".z8"
            options.force_recompile = True
            game = make(settings, options)
            built = Path(textworld.generator.compile_game(game, options))
            # the .json first, the .z8 last and atomically: a .z8 in the cache always has its .json
            os.replace(built.with_suffix(".json"), path.with_suffix(".json"))
            os.replace(built, path)
        return path

    def games(self, seeds: Sequence[int], desc: str | None = None) -> list[Path]:
        """Game files for ``seeds`` (those not cached yet are generated, with a progress bar)."""
        from ..tracking import progress

        missing = [s for s in seeds if not (self.folder() / f"seed{s}.z8").exists()]
        if missing:
            for s in progress(missing, desc=desc or f"generating {self.name} games"):
                self.game(s)
        return [self.game(s) for s in seeds]


def fingerprint(path: str | os.PathLike) -> str:
    """A hash of a game's world (facts, entity names and the quest's commands): two seeds that happened
    to generate the same game get the same fingerprint."""
    data = _read_json(Path(path))
    key = json.dumps([data.get("world"), [i[1].get("name") for i in data.get("infos", [])],
                      [q.get("commands") for q in data.get("quests", [])]], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def split_games(family: GameFamily, n_train: int, n_held_out: int,
                held_out_from: int = 10_000) -> tuple[list[Path], list[Path]]:
    """(training games, HELD-OUT games) of ``family``: seeds 0..n_train−1 and held_out_from.., every held-out
    game checked by :func:`fingerprint` to differ from every training game (a repeat is skipped and the next
    seed taken), so no held-out game was ever trained on."""
    train = family.games(range(n_train), desc=f"{family.name}: training games")
    seen = {fingerprint(p) for p in train}
    held, seed = [], held_out_from
    while len(held) < n_held_out:
        batch = family.games(range(seed, seed + n_held_out - len(held)), desc=f"{family.name}: held-out games")
        seed += len(batch)
        for p in batch:
            f = fingerprint(p)
            if f not in seen:
                seen.add(f)
                held.append(p)
        if seed > held_out_from + 10 * n_held_out + 10:
            raise RuntimeError(f"{family.name}: only {len(held)} distinct held-out games "
                               f"in {seed - held_out_from} seeds")
    return train, held


# ---------------------------------------------------------------------------------------------
# Game files: checked, with one-line errors
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    meta = path.with_suffix(".json")
    if not meta.exists():
        raise GameFileError(f"{path}: no {meta.name} beside it (TextWorld writes one with every game; "
                            "the admissible commands and the score come from it)")
    try:
        return json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GameFileError(f"{meta}: corrupt game metadata "
                            f"({err.__class__.__name__}: {str(err).splitlines()[0]})") from None


def _check_story(path: Path) -> None:
    """The Z-machine header of a story file: version byte, declared length, checksum. (The interpreter ends the
    whole process on a bad file, so it is checked before loading.)"""
    data = path.read_bytes()
    if len(data) < 64 or not 1 <= data[0] <= 8:
        raise GameFileError(f"{path}: not a Z-machine game (a TextWorld game is a .z8 story file)")
    scale = 2 if data[0] <= 3 else 4 if data[0] <= 5 else 8
    length = int.from_bytes(data[0x1A:0x1C], "big") * scale or len(data)
    if length > len(data):
        raise GameFileError(f"{path}: truncated ({len(data)} bytes, the header says {length})")
    checksum = int.from_bytes(data[0x1C:0x1E], "big")
    if checksum and sum(data[0x40:length]) % 65536 != checksum:
        raise GameFileError(f"{path}: corrupt (the Z-machine checksum does not match)")


def check_game(path: str | os.PathLike) -> Path:
    """The path of a game file that exists, is an intact Z-machine story and has its .json; else
    :class:`GameFileError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise GameFileError(f"{path}: no such game file")
    _check_story(path)
    _read_json(path)
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:200]}" if text else err.__class__.__name__


def _clean(text: str | None) -> str:
    """Game text without TextWorld's ASCII-art banner, runs of blank lines or trailing spaces."""
    lines = [ln.rstrip() for ln in (text or "").splitlines()
             if "$$" not in ln and not re.fullmatch(r"[\s_\\|/]*\\?[_]+.*", ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------
class TextWorldEnv:
    """TextWorld games speaking the shared protocol: ``reset(seed, game=None) -> text``,
    ``step(command) -> (text, reward, done, info)``; reward = change in score.

    Each ``reset`` draws one of ``games`` (seeded) unless ``game`` (an index into ``games`` or a path)
    says which. ``actions`` is None: the menu changes with the state, and lives in
    ``info["admissible_commands"]`` (and ``self.info``). Any text is a valid ``step`` argument (the
    game's parser answers what it does not understand), so a free-text policy plays too.
    """

    actions = None

    def __init__(self, games: Sequence[str | os.PathLike], max_steps: int = 50):
        self._textworld = require_textworld()
        if not games:
            raise ValueError("TextWorldEnv needs at least one game file")
        if max_steps < 1:
            raise ValueError(f"TextWorldEnv: max_steps must be ≥ 1, got {max_steps}")
        self.games = [check_game(g) for g in games]
        self.max_steps = max_steps
        self._envs: dict[Path, object] = {}
        self._env = None
        self.game: Path | None = None
        self.info: dict = {}
        self.moves = 0
        self.done = True

    def _open(self, path: Path):
        if path not in self._envs:
            textworld = self._textworld
            infos = textworld.EnvInfos(admissible_commands=True, score=True, max_score=True, won=True, lost=True,
                                       description=True, inventory=True, objective=True)
            try:
                # jericho does not know TextWorld's games; TextWorld keeps the score itself
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*not fully supported")
                    self._envs[path] = textworld.start(str(path), request_infos=infos)
            except Exception as err:  # noqa: BLE001 — any failure to load is the file's fault: name it
                raise GameFileError(f"{path}: not a playable TextWorld game ({_first_line(err)})") from None
        return self._envs[path]

    def _info(self, state, reward: float, truncated: bool) -> dict:
        commands = state.get("admissible_commands")
        if commands is None:
            raise GameFileError(f"{self.game}: the game gave no admissible commands (is its .json from another game?)")
        return {"admissible_commands": sorted(commands), "score": float(state["score"]),
                "max_score": float(state["max_score"]), "won": bool(state["won"]), "lost": bool(state["lost"]),
                "moves": self.moves, "truncated": truncated, "reward": reward,
                "description": _clean(state.get("description")), "inventory": _clean(state.get("inventory")),
                "objective": _clean(state.get("objective")), "game": str(self.game)}

    def reset(self, seed: int | None = None, game: int | str | os.PathLike | None = None) -> str:
        if game is None:
            self.game = random.Random(seed).choice(self.games)
        elif isinstance(game, int):
            self.game = self.games[game]
        else:
            self.game = check_game(game)
        self._env = self._open(self.game)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not fully supported")
                state = self._env.reset()
        except Exception as err:  # noqa: BLE001
            raise GameFileError(f"{self.game}: not a playable TextWorld game ({_first_line(err)})") from None
        self.moves, self.done = 0, False
        self.info = self._info(state, 0.0, False)
        self.info["last_command"] = ""
        return f"{self.info['objective']}\n\n{self.info['description']}"

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("TextWorldEnv.step() after the episode ended: call reset()")
        before = self.info["score"]
        state, _, game_over = self._env.step(action)
        self.moves += 1
        reward = float(state["score"]) - before
        truncated = not game_over and self.moves >= self.max_steps
        self.done = bool(game_over) or truncated
        self.info = self._info(state, reward, truncated)
        self.info["last_command"] = action
        return _clean(state.feedback), reward, self.done, dict(self.info)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def state_fields(observation: str, info: dict, include_objective: bool = True) -> tuple[str, ...]:
    """The texts a policy reads at a decision: the last command, the game's answer to it, the room (``look``,
    when the answer is not already it), the inventory and (optionally) the objective."""
    last = info.get("last_command")
    fields = [f"Last command: {last}." if last else "Start of the game."]
    answer = observation.strip()
    description = info.get("description", "")
    if last:  # at reset the observation is objective + room: both follow as their own fields
        fields.append(answer)
    if description and description not in answer:
        fields.append(description)
    fields.append(info.get("inventory", ""))
    if include_objective:
        fields.append(info.get("objective", ""))
    return tuple(f for f in fields if f)


Policy = Callable[[list[str], list[dict], int], list[str]]
"""policy(observations, infos, episode index) → one command per game still playing (one batched call per step)."""


def random_policy(seed: int = 0) -> Policy:
    """The baseline: a uniform draw from each state's admissible commands."""
    rng = random.Random(seed)
    return lambda observations, infos, episode: [rng.choice(info["admissible_commands"]) for info in infos]


def play_games(policy: Policy, games: Sequence, max_steps: int, samples: int = 1) -> dict:
    """``samples`` episodes of every game, the games side by side (one policy call per step for all of them).

    Returns {"normalized": (G,) mean normalised score per game, "won": (G,) share of episodes won,
    "moves": (G,) mean episode length, "episodes": G · samples}.
    """
    import numpy as np

    envs = [TextWorldEnv([g], max_steps) for g in games]
    score, won, moves = (np.zeros((len(games), samples)) for _ in range(3))
    for k in range(samples):
        obs = [env.reset(k) for env in envs]
        active = list(range(len(envs)))
        while active:
            commands = policy([obs[i] for i in active], [envs[i].info for i in active], k)
            still = []
            for i, c in zip(active, commands):
                obs[i], _, done, info = envs[i].step(c)
                if done:
                    score[i, k] = info["score"] / max(info["max_score"], 1e-9)
                    won[i, k], moves[i, k] = info["won"], info["moves"]
                else:
                    still.append(i)
            active = still
    for env in envs:
        env.close()
    return {"normalized": score.mean(1), "won": won.mean(1), "moves": moves.mean(1), "episodes": len(games) * samples}


def resolve_games(spec: str, seeds: Sequence[int] = (0,)) -> list[Path]:
    """A game file, a folder of .z8 games, or a tw-make family (``"tw-coin_collector --level 5"``, games of
    ``seeds``)."""
    require_textworld()
    path = Path(spec)
    if path.suffix in (".z8", ".z5", ".ulx", ".json") or path.is_file():
        return [check_game(path.with_suffix(".z8") if path.suffix == ".json" else path)]
    if path.is_dir():
        games = sorted(path.glob("*.z8"))
        if not games:
            raise GameFileError(f"{path}: a folder without .z8 games")
        return [check_game(g) for g in games]
    return GameFamily.parse(spec).games(list(seeds))


def _main(argv: Sequence[str] | None = None) -> int:
    from ..cli import Parser, nonneg_int, positive_int

    parser = Parser(prog="python -m rlnlp.envs.textworld",
                    description="Play TextWorld games with the random-admissible-command policy.")
    parser.add_argument("games", help="a .z8 game file, a folder of them, "
                                      "or a tw-make family such as 'tw-coin_collector --level 5'")
    parser.add_argument("--seed", type=nonneg_int, nargs="+", default=[0], help="game seeds of a family (default 0)")
    parser.add_argument("--episodes", type=positive_int, default=4, help="random episodes per game")
    parser.add_argument("--max-steps", type=positive_int, default=50, help="step cap per episode")
    args = parser.parse_args(argv)
    games = resolve_games(args.games, args.seed)
    res = play_games(random_policy(0), games, args.max_steps, samples=args.episodes)
    for game, score, won in zip(games, res["normalized"], res["won"]):
        print(f"{game}: random admissible commands, {args.episodes} episodes ≤ {args.max_steps} steps: "
              f"normalised score {score:.2f}, won {won:.0%}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlnlp.envs.textworld GAMES``: a missing game, a corrupt file or a bad option is one line, exit 2."""
    from ..cli import run

    return run(_main, argv, errors=(TextWorldMissing, GameFileError, ValueError, FileNotFoundError),
               prog="python -m rlnlp.envs.textworld")


if __name__ == "__main__":
    sys.exit(main())
