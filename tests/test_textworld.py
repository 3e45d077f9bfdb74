"""TextWorld: the reset/step protocol over generated games (score deltas as rewards, the step cap, a held-out
split disjoint from training, one-line errors), and alectors' command scorer (shapes, masking, PPO direction).

Each test names the mutation it must fail under."""
import json
import shutil

import pytest
import torch

from rlnlp.envs import textworld as tw

pytestmark = pytest.mark.skipif(not tw.AVAILABLE, reason=tw.MISSING_MESSAGE)

COIN = tw.GameFamily("tw-coin_collector", ("--level", "5"))
SIMPLE = tw.GameFamily("tw-simple", ("--rewards", "dense", "--goal", "brief"))


@pytest.fixture(scope="module")
def coin_game():
    return COIN.game(0)


@pytest.fixture(scope="module")
def simple_game():
    return SIMPLE.game(0)


def walkthrough(game):
    return json.loads(game.with_suffix(".json").read_text())["metadata"]["walkthrough"]


def test_rewards_are_score_deltas_and_the_walkthrough_wins(simple_game):
    """tw-simple dense pays at several steps. Mutation this test must fail under:
    reward = the running score instead of its change (the rewards then sum past max_score)."""
    env = tw.TextWorldEnv([simple_game], max_steps=100)
    obs = env.reset(0)
    assert isinstance(obs, str) and obs and env.info["score"] == 0 and env.info["admissible_commands"]
    total, paid, info, done = 0.0, 0, env.info, False
    for command in walkthrough(simple_game):
        assert command in info["admissible_commands"], (command, info["admissible_commands"])
        before = info["score"]
        obs, reward, done, info = env.step(command)
        assert reward == info["score"] - before
        total += reward
        paid += reward > 0
    assert done and info["won"] and not info["truncated"]
    assert paid >= 2  # several intermediate rewards, not one at the end
    assert total == info["score"] == info["max_score"] > 1


def test_step_cap_truncates_and_a_finished_episode_refuses_steps(coin_game):
    """Mutation this test must fail under: `truncated = not game_over and self.moves > self.max_steps`
    (one step too many)."""
    env = tw.TextWorldEnv([coin_game], max_steps=3)
    env.reset(0)
    dones = [env.step("look")[2] for _ in range(3)]
    assert dones == [False, False, True]
    assert env.info["truncated"] and not env.info["won"] and env.info["moves"] == 3
    with pytest.raises(RuntimeError, match="reset"):
        env.step("look")


def test_held_out_games_are_disjoint_from_training_games():
    """Mutation this test must fail under: held-out seeds starting at 0 (`held_out_from=0`)
    — the same games in both sets."""
    train, held = tw.split_games(COIN, 3, 3)
    assert len(train) == len(held) == 3
    assert not set(train) & set(held)
    prints = [tw.fingerprint(p) for p in train + held]
    assert len(set(prints)) == 6  # six different worlds, not six names for one
    assert tw.fingerprint(train[0]) == tw.fingerprint(COIN.game(0))


def test_a_game_given_as_a_file_outside_the_cache_plays(tmp_path, coin_game):
    """A user's own game file (here a copy elsewhere): played by its path.
    Mutation this test must fail under: reset(game=path) looking the path up among the env's games."""
    mine = tmp_path / "mine.z8"
    shutil.copy(coin_game, mine)
    shutil.copy(coin_game.with_suffix(".json"), mine.with_suffix(".json"))
    env = tw.TextWorldEnv([coin_game], max_steps=20)
    env.reset(0, game=mine)
    assert env.game == mine
    for command in walkthrough(coin_game):
        _, _, done, info = env.step(command)
    assert done and info["won"]
    assert tw.resolve_games(str(mine)) == [mine]


def test_bad_game_files_are_one_line_naming_the_file(tmp_path, coin_game, capsys):
    """Mutations this test must fail under: dropping the .json check
    (the missing-.json case then loads without commands) and
    dropping the Z-machine header check (the interpreter then ends the whole test process: "Fatal error: Unknown
    Z-code version")."""
    missing = tmp_path / "nowhere.z8"
    with pytest.raises(tw.GameFileError) as err:
        tw.TextWorldEnv([missing])
    assert str(missing) in str(err.value) and "\n" not in str(err.value)

    lonely = tmp_path / "lonely.z8"
    shutil.copy(coin_game, lonely)
    with pytest.raises(tw.GameFileError, match="lonely.json") as err:
        tw.TextWorldEnv([lonely])
    assert "\n" not in str(err.value)

    for name, content in (("garbage", b"not a z-machine story file" * 10), ("truncated", coin_game.read_bytes()[:5000]),
                          ("flipped", flip_one_byte(coin_game.read_bytes()))):
        corrupt = tmp_path / f"{name}.z8"
        corrupt.write_bytes(content)
        shutil.copy(coin_game.with_suffix(".json"), corrupt.with_suffix(".json"))
        with pytest.raises(tw.GameFileError) as err:  # the interpreter would end the process: checked before loading
            tw.TextWorldEnv([corrupt]).reset(0)
        assert str(corrupt) in str(err.value) and "\n" not in str(err.value)

    assert tw.main([str(missing)]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and str(missing) in out.err


def flip_one_byte(data: bytes) -> bytes:
    data = bytearray(data)
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


def test_unknown_family_or_setting_is_one_line():
    """Mutation this test must fail under: the plain argparse parser (prints usage and exits instead of raising)."""
    with pytest.raises(ValueError, match="unknown TextWorld challenge") as err:
        tw.GameFamily.parse("tw-nonsense --level 5")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="level") as err:
        tw.GameFamily.parse("tw-coin_collector --levle 5")
    assert "\n" not in str(err.value)
    assert tw.GameFamily.parse("tw-make tw-coin_collector --level 5") == COIN
    assert COIN.command(7) == "tw-make tw-coin_collector --level 5 --seed 7"


def test_without_textworld_every_entry_point_says_so_in_one_line(monkeypatch, coin_game):
    """Mutation this test must fail under: TextWorldEnv importing textworld without require_textworld
    (no error at all here)."""
    monkeypatch.setattr(tw, "AVAILABLE", False)
    for call in (lambda: tw.TextWorldEnv([coin_game]), lambda: COIN.parsed_settings()):
        with pytest.raises(tw.TextWorldMissing) as err:
            call()
        assert "\n" not in str(err.value) and "Linux" in str(err.value)


# ---------------------------------------------------------------------------------------------
# alectors' command scorer
# ---------------------------------------------------------------------------------------------
class WordEncoder:
    """Stands in for TextEncoder: a fixed random vector per word; tokens() per word, embed() their mean."""

    def __init__(self, dim=16, seed=0):
        self.dim, self.forward_passes, self.words = dim, 0, {}
        self.gen = torch.Generator().manual_seed(seed)

    def _vecs(self, text):
        out = []
        for w in text.lower().split():
            if w not in self.words:
                self.words[w] = torch.randn(self.dim, generator=self.gen)
            out.append(self.words[w])
        return torch.stack(out)

    def tokens(self, texts):
        rows = [self._vecs(t) for t in texts]
        T = max(r.shape[0] for r in rows)
        emb, mask = torch.zeros(len(rows), T, self.dim), torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            emb[i, : len(r)], mask[i, : len(r)] = r, True
        return emb, mask

    def embed(self, texts):
        return torch.stack([self._vecs(t).mean(0) for t in texts])


def tiny_cfg(**kw):
    from rlnlp.alectors import TextWorldConfig

    return TextWorldConfig(d_model=16, n_heads=2, ff_dim=32, **kw)


STATES = [(("Last command: go south.", "A kitchen. Exits east and north."), ("go east", "go north", "look")),
          (("Start of the game.", "A dim cellar. An exit to the west.", "You carry nothing."),
           ("go west", "inventory"))]


def test_command_scores_have_menu_shapes_and_padding_gets_no_probability():
    """Mutation this test must fail under: CommandScorer without the masked_fill (the padded third slot of state 2 then
    gets probability)."""
    from rlnlp.alectors import MenuAlector, read_states

    torch.manual_seed(0)
    cfg, enc = tiny_cfg(), WordEncoder()
    batch = read_states(enc, STATES, cfg.max_tokens, torch.device("cpu"))
    assert batch.mask.sum(1).tolist() == [4 + 6, 4 + 8 + 3]  # words per state: its fields concatenated
    assert batch.emb.shape == (2, 15, 16)
    assert batch.commands.shape == (2, 3, 16) and batch.command_mask.tolist() == [[True] * 3, [True, True, False]]
    agent = MenuAlector(enc.dim, cfg)
    logits, weights = agent.actor(batch, batch.command_mask)
    assert logits.shape == (2, 3) and weights.shape == batch.mask.shape
    probs = agent.dist(batch).probs
    assert probs[1, 2] == 0 and torch.allclose(probs.sum(-1), torch.ones(2))
    assert agent.value(batch).shape == (2,)
    # a command's score does not depend on where it sits in the menu (DRRN scores pairs)
    swapped = read_states(enc, [(STATES[0][0], ("look", "go north", "go east"))], cfg.max_tokens, torch.device("cpu"))
    torch.testing.assert_close(agent.actor(swapped, swapped.command_mask)[0][0], logits[0].flip(0))


def test_ppo_on_menu_states_moves_command_probabilities_with_the_advantage_sign():
    """alectors' own ppo_update trains the menu agent. Mutation this test must fail under: the scorer
    ignoring the command (`torch.cat([s, s * 0, s * 0])`: one logit for the whole menu,
    no command can rise over another)."""
    from rlnlp.alectors import MenuAlector, make_optimizers, ppo_update, read_states

    torch.manual_seed(0)
    cfg, enc = tiny_cfg(epochs=5, target_kl=None, lr=1e-2), WordEncoder()
    batch = read_states(enc, STATES, cfg.max_tokens, torch.device("cpu"))
    agent = MenuAlector(enc.dim, cfg)
    actions = torch.tensor([1, 0])
    with torch.no_grad():
        dist = agent.dist(batch)
        before, old_logp = dist.probs[torch.arange(2), actions], dist.log_prob(actions)
    ppo_update(agent, make_optimizers(agent, cfg), batch, batch.command_mask, actions, old_logp,
               advantages=torch.tensor([1.0, -1.0]), returns=torch.zeros(2), old_values=torch.zeros(2), cfg=cfg)
    with torch.no_grad():
        after = agent.dist(batch).probs[torch.arange(2), actions]
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3, (before, after)


def test_state_fields_carry_the_last_command_and_skip_a_repeated_room():
    """Mutation this test must fail under: dropping the last-command field
    (the reader then cannot tell forward from back)."""
    info = {"last_command": "go east", "description": "-= Attic =- Exits west and north.",
            "inventory": "You carry nothing.", "objective": "Find the coin."}
    fields = tw.state_fields("-= Attic =- Exits west and north.", info)
    assert fields == (
        "Last command: go east.", "-= Attic =- Exits west and north.", "You carry nothing.", "Find the coin."
    )
    assert tw.state_fields("You carry nothing.", {**info, "last_command": "inventory"})[1:3] == (
        "You carry nothing.", "-= Attic =- Exits west and north.")


def test_a_short_training_run_on_real_games_and_its_transcript_widget(coin_game):
    """The whole loop on two real games (fake encoder): episodes end, PPO steps, the transcript widget builds.
    Mutation this test must fail under: collect() not resetting a finished env (the next step raises)."""
    from rlnlp import widgets
    from rlnlp.alectors import textworld as AT

    torch.manual_seed(0)
    cfg = tiny_cfg(num_envs=2, num_steps=12, max_steps=6, eval_every=2, select_games=1, minibatch_size=16)
    enc = WordEncoder()
    run = AT.train(cfg, enc, [coin_game, COIN.game(1)], updates=2, run_name="test_textworld_loop")
    assert len(run.episodes) >= 2 and run.tracker.df["stats/actor_steps"].sum() > 0
    assert set(run.evals["update"]) == {-1, 1}
    steps = AT.transcript(run.best, enc, cfg, coin_game)
    assert 1 <= len(steps) <= cfg.max_steps and steps[-1]["done"]
    assert abs(sum(steps[0]["command probabilities"].values()) - 1) < 1e-5
    assert widgets.stepper(steps, title="coin collector") is not None


# ---------------------------------------------------------------------------------------------
# The LM menu policy
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy_lm():
    from rlnlp import load_policy

    torch.manual_seed(0)
    return load_policy(device="cpu", trainable=True)


PROMPTS = ["You are in a kitchen. There is an exit to the east.\n>",
           "A long corridor with doors to the north and to the south. You carry nothing.\n>"]
MENUS = [["go east", "inventory"], ["go north", "go south", "look"]]


def test_menu_logprobs_share_the_prompt_and_match_the_naive_score(policy_lm):
    """The shared-prefill score equals scoring each (prompt, command) pair on its own (prompts of different
    lengths: left padding). Mutation this test must fail under: command positions starting at the padded prompt width
    instead of each prompt's own length."""
    from rlnlp.models import completion_logprobs
    from rlnlp.textworld_lm import menu_logprobs

    model, tok = policy_lm
    with torch.no_grad():
        got = menu_logprobs(model, tok, PROMPTS, MENUS)
        for prompt, menu, logp in zip(PROMPTS, MENUS, got):
            p = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
            naive = []
            for c in menu:
                c_ids = torch.tensor([tok(" " + c, add_special_tokens=False)["input_ids"]])
                naive.append(completion_logprobs(model, p, torch.ones_like(p), c_ids, torch.ones_like(c_ids)).sum())
            torch.testing.assert_close(logp, torch.log_softmax(torch.stack(naive), 0), atol=2e-4, rtol=1e-4)


def test_one_reinforce_step_raises_the_rewarded_command(policy_lm):
    """Mutation this test must fail under: reinforce_loss without its minus sign (the rewarded command then falls)."""
    from rlnlp.losses import reinforce_loss
    from rlnlp.models import attach_lora
    from rlnlp.textworld_lm import menu_logprobs

    model, tok = policy_lm
    model = attach_lora(copy_of(model), r=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        before = menu_logprobs(model, tok, PROMPTS[:1], MENUS[:1])[0]
    for _ in range(2):
        opt.zero_grad()
        logp = menu_logprobs(model, tok, PROMPTS[:1] * 2, MENUS[:1] * 2)
        loss, _ = reinforce_loss(torch.stack([logp[0][1], logp[1][0]]), torch.tensor([1.0, -1.0]))
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = menu_logprobs(model, tok, PROMPTS[:1], MENUS[:1])[0]
    assert after[1] > before[1] + 1e-3, (before, after)  # "inventory" was rewarded, "go east" penalised


def copy_of(model):
    import copy

    return copy.deepcopy(model)
