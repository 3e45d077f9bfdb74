"""ERL's sparse candidate tasks (notebook 05, data/erl/README.md): binary rewards, feedback that names the fault, and
data files whose first five families did not move when the candidates were added."""
import json

from rlnlp.envs import feedback_tasks as ft


def test_digits_feedback_names_the_wrong_places_without_the_answer():
    spec = {"answer": 1709}
    assert ft.score("digits", "878 + 831 = 1709", spec) == (1.0, "Correct: 1709 is the answer.")
    r, f = ft.score("digits", "1609", spec)
    # mutation: comparing digits left to right (not by place from the right) names "hundreds" wrongly → fails
    assert r == 0.0 and f == "Your answer 1609 is too low: its hundreds digit is wrong."
    r, f = ft.score("digits", "1790", spec)
    assert f == "Your answer 1790 is too high: its ones and tens digits are wrong." and "1709" not in f
    assert ft.score("digits", "709", spec)[1] == "Your answer 709 has 3 digits; the answer has 4."
    assert ft.score("digits", "no idea", spec)[0] == 0.0


def test_lake3_feedback_names_step_move_and_cell():
    grid = ["FSF", "FHF", "GFF"]  # S at row 1 column 2, a hole below it, G at row 3 column 1
    assert ft.score("lake3", "left, down, down", {"grid": grid}) == (1.0, "Correct: you reached the goal in 3 moves.")
    # mutation: starting the walk at the top-left corner (not at S) → "down" lands at row 2 column 1, no hole → fails
    assert ft.score("lake3", "down", {"grid": grid}) == (
        0.0,
        "Step 1, down: you fell into the hole at row 2, column 2.",
    )
    assert ft.score("lake3", "up", {"grid": grid})[1] == "Step 1, up: you walked off the map from row 1, column 2."
    assert ft.score("lake3", "left, down", {"grid": grid}) == (
        0.0, "Your 2 moves stopped at row 2, column 1; the goal is at row 3, column 1.")


def test_guess_once_and_json_pair_are_binary_and_explain():
    spec = {"lo": 10, "hi": 29, "answer": 17}
    assert ft.score("guess_once", "17", spec)[0] == 1.0
    assert ft.score("guess_once", "My guess is 20", spec) == (0.0, "Your guess 20 is too high.")
    assert ft.score("guess_once", "40", spec) == (0.0, "Your guess 40 is outside 10 to 29.")
    pairs = {"pairs": [["color", "blue"], ["city", "Oslo"]]}
    assert ft.score("json_pair", '{"color": "blue", "city": "oslo"}', pairs)[0] == 1.0
    # binary: one right pair earns nothing (json_key's 0.5 would give GRPO groups a variance the task lacks)
    assert ft.score("json_pair", '{"color": "blue"}', pairs) == (
        0.0,
        "Your JSON has no key \"city\"; it has ['color'].",
    )
    assert ft.score("json_pair", '{"color": "red", "city": "Oslo"}', pairs)[1] == \
        'Your key "color" has the value "red"; it must be "blue".'


def test_json_value_feedback_states_the_rule_the_prompt_leaves_out():
    row = ft.read_rows("eval", "json_value")[0]
    value = json.loads(row["spec"])["value"]
    assert '"value"' not in row["prompt"] and value in row["prompt"]  # the convention is not in the task
    assert ft.score("json_value", f'{{"key": "x", "value": "{value}"}}', row["spec"])[0] == 1.0
    # mutation: scoring json_key's way (any key holding the word) → this reply scores 1 and the test fails
    r, f = ft.score("json_value", f'{{"word": "{value}"}}', row["spec"])
    assert r == 0.0 and f == f'Your JSON has no key "value"; this task wants {{"value": "{value}"}}.'


def test_generated_lakes_are_solvable_from_their_start():
    for row in ft.read_rows("eval", "lake3")[:40]:
        grid = json.loads(row["spec"])["grid"]
        start = next((r, line.index("S")) for r, line in enumerate(grid) if "S" in line)
        # mutation: _lake_path_exists ignoring ``start`` (searching from the corner) lets unsolvable maps through
        assert ft._lake_path_exists(grid, start), grid


def test_adding_families_keeps_the_first_five_rows():
    """The candidates are drawn after the first five families, so notebook 05's committed json_key results keep their
    prompts. Mutation: putting a candidate before frozen_lake in TASKS shifts the generator
    → the first split differs."""
    first = ft.generate(seed=0, tasks=ft.TASKS[:5])
    everything = ft.generate(seed=0)
    for split in ("train", "eval"):
        assert everything[split][: len(first[split])] == first[split]
    assert {r["task"] for r in everything["eval"]} == set(ft.TASKS) and set(ft.SPARSE_TASKS) <= set(ft.TASKS)

