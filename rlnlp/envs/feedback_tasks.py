"""Single-turn tasks with a reward in [0, 1] AND a feedback sentence saying what was wrong (ERL, notebook 05).

ERL needs both signals: the reward drives the policy gradient, the feedback is what the model
reflects on. Ten task families; the untrained 135M policy's base rates are in data/erl/README.md
(json_key, arithmetic and letters are in the learnable zone; frozen_lake is too hard for it):

* ``word_count``  — "Write one sentence about cats with exactly 5 words."
                    reward 1 − |k − n| / n (clipped at 0); "Your sentence had 7 words; it needs exactly 5."
* ``arithmetic``  — "What is 7 + 5?"  reward 1 or 0 (the last number counts); "Your answer 13 is too high."
* ``json_key``    — "Reply with a JSON object whose key "color" has the value "blue"."
                    1 correct, 0.5 valid JSON but wrong key/value, 0 not JSON; the feedback names the fault.
* ``letters``     — first letter / last letter / number of letters of a word; 1 or 0.
* ``frozen_lake`` — FrozenLake as a plan: a 4×4 map in text, answer with the whole move list.
                    1 at the goal, 0 in a hole ("You fell into a hole at step 3 ..."), else
                    0.5 × the fraction of the distance to the goal covered.

Five sparse families with a binary reward, candidates for reflection's zone (first attempts that rarely succeed,
feedback that says what to change; their measured numbers are in data/erl/README.md):

* ``guess_once``  — "I picked a whole number from 196 to 215. Guess it in one try."  "Your guess 12 is too high."
* ``digits``      — "What is 878 + 831?" / "What is 47 * 8?"; the feedback names the wrong places, not the answer:
                    "Your answer 1790 is too high: its ones and tens digits are wrong."
* ``lake3``       — a 3×3 lake with S and G anywhere: "Step 2, right: you fell into the hole at row 2, column 2."
* ``json_pair``   — two keys with their values; 1 only when both are right.
* ``json_value``  — the word must sit under the key "value", a rule only the feedback states.

A reply cut off at the token cap (``truncated=True``) keeps its reward, and its feedback says so first.

Three faces of the same tasks:

1. the shared environment protocol: ``FeedbackTaskEnv(...).reset(seed) -> prompt``,
   ``.step(answer) -> (feedback, reward, True, info)`` (single-turn);
2. TRL-style functions ``reward_func(prompts, completions, task, spec, **kw) -> list[float]`` and
   ``feedback_func(..., truncated=None) -> list[str]`` (completions may be strings or chat message lists);
3. Hugging Face datasets with ``train`` / ``eval`` splits: ``load_split(...)`` / ``load_splits(...)``
   read data/erl/{train,eval}.jsonl (150 held-out prompts per task), which
   ``python -m rlnlp.envs.feedback_tasks`` regenerates (seeded, reproducible).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Sequence

from ..cli import Parser, positive_int, run

TASKS = ("word_count", "arithmetic", "json_key", "letters", "frozen_lake",
         "guess_once", "digits", "lake3", "json_pair", "json_value")
# The four sparse families after frozen_lake are candidates for reflection's zone: a first attempt that rarely
# succeeds (binary reward) and a feedback sentence that says what to change. They come after the first five in
# ``TASKS`` so that the seeded generator draws the first five families' rows exactly as before.
SPARSE_TASKS = ("guess_once", "digits", "lake3", "json_pair", "json_value")
DATA_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "erl"
NUMBER = re.compile(r"-?\d+")

# ----------------------------------------------------------------------------------------------
# instance generators: each returns (prompt text, spec dict); the spec holds everything the
# reward and the feedback need, so a dataset row is self-contained.

TOPICS = ["cats", "rain", "the sea", "coffee", "winter", "a dog", "music", "the moon", "bread", "trees",
          "a river", "books", "snow", "the sun", "a train", "flowers", "the city", "birds", "tea", "school",
          "summer", "a garden", "the wind", "a bicycle", "horses", "the night", "apples", "a forest", "clouds",
          "a kitchen", "friends", "the beach", "a storm", "mountains", "a candle", "the market", "fish", "a clock",
          "the road", "a letter", "soup", "a bridge", "autumn", "a window", "the stars", "a farm", "a boat",
          "spring", "a library", "cheese", "a song", "the desert", "a lamp", "the park", "a map", "honey",
          "the rainforest", "a castle", "a rabbit", "the harbor"]
WORDS = ["apple", "house", "river", "green", "tiger", "cloud", "bread", "chair", "light", "stone", "water",
         "music", "plant", "table", "horse", "smile", "dream", "ocean", "paper", "sugar", "lemon", "candle",
         "garden", "window", "rabbit", "yellow", "pencil", "orange", "forest", "silver", "cat", "dog", "sun",
         "book", "tree", "moon", "fish", "bird", "milk", "rain", "bottle", "button", "carpet", "doctor", "engine",
         "flower", "guitar", "hammer", "island", "jacket", "kitten", "ladder", "magnet", "needle", "pepper",
         "planet", "rocket", "saddle", "tomato", "turtle", "violin", "wallet", "bucket", "castle", "dragon",
         "finger", "ginger", "helmet", "insect", "jungle", "kettle", "lizard", "monkey", "napkin", "pillow",
         "puzzle", "ribbon", "spider", "tunnel", "velvet", "walrus", "zipper", "anchor", "banana", "cherry",
         "desert", "farmer", "goblin", "harbor", "igloo", "juice", "knife", "lamp", "mouse", "nest", "owl",
         "piano", "queen", "robot", "snake", "train", "umbrella", "village", "wheel", "zebra", "basket", "coffee",
         "daisy", "eagle", "feather", "grape", "honey", "iron", "jelly", "koala", "lion", "mango", "nurse", "onion",
         "parrot", "quilt", "radio", "sheep", "tulip", "uncle", "vase", "whale", "yogurt"]
JSON_VALUES = {
    "color": ["blue", "red", "green", "black", "white", "pink", "gray", "brown", "purple", "gold",
              "orange", "yellow", "silver", "teal", "navy", "beige", "olive", "maroon", "violet", "cyan"],
    "name": ["Anna", "Tom", "Maria", "Ben", "Lena", "Omar", "Sara", "Paul", "Mia", "Ivan",
             "Nora", "Leo", "Emma", "Sam", "Ada", "Max", "Zoe", "Hugo", "Lily", "Noah"],
    "city": ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Berlin", "Quito", "Dublin", "Seoul",
             "Madrid", "Vienna", "Prague", "Lisbon", "Athens", "Delhi", "Sydney", "Toronto", "Nairobi", "Bogota"],
    "animal": ["cat", "dog", "owl", "fox", "bear", "frog", "duck", "wolf", "lion", "goat",
               "horse", "mouse", "tiger", "zebra", "sheep", "camel", "eagle", "shark", "whale", "panda"],
    "fruit": ["apple", "pear", "plum", "kiwi", "mango", "lime", "fig", "peach", "grape", "cherry",
              "lemon", "melon", "banana", "orange", "papaya", "guava", "date", "apricot", "coconut", "berry"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "today",
            "tomorrow", "yesterday"],
    "month": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"],
    "country": ["France", "Italy", "Norway", "Peru", "Egypt", "Japan", "Germany", "Ecuador", "Ireland", "Korea",
                "Spain", "Austria", "Chile", "Portugal", "Greece", "India", "Canada", "Kenya", "Brazil", "Mexico"],
    "food": ["pizza", "pasta", "rice", "soup", "salad", "bread", "cheese", "sushi", "tacos", "curry",
             "noodles", "beans", "steak", "pie", "cake", "eggs", "toast", "fries", "stew", "waffles"],
    "sport": ["tennis", "soccer", "golf", "hockey", "rugby", "boxing", "cricket", "chess", "skiing", "rowing",
              "cycling", "karate", "judo", "surfing", "archery", "fencing", "diving", "sailing", "running", "polo"],
    "drink": ["tea", "coffee", "milk", "juice", "water", "cocoa", "soda", "lemonade", "cider", "smoothie"],
    "planet": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"],
    "metal": ["iron", "gold", "silver", "copper", "tin", "zinc", "lead", "nickel", "steel", "bronze"],
    "flower": ["rose", "tulip", "lily", "daisy", "orchid", "poppy", "iris", "lotus", "violet", "jasmine"],
    "tool": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "pliers", "ladder", "axe"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "harp", "cello", "trumpet", "banjo", "organ"],
    "shape": ["circle", "square", "triangle", "oval", "star", "heart", "diamond", "cube", "cone", "sphere"],
    "language": ["English", "French", "Spanish", "German", "Italian", "Dutch", "Polish", "Greek", "Hindi",
                 "Arabic", "Swahili", "Korean"],
    "vehicle": ["car", "bus", "truck", "bike", "boat", "plane", "train", "tram", "scooter", "van"],
    "bird": ["robin", "crow", "swan", "parrot", "eagle", "owl", "hawk", "dove", "finch", "heron"],
    "gem": ["ruby", "emerald", "sapphire", "diamond", "pearl", "opal", "topaz", "jade", "amber", "onyx"],
    "tree": ["oak", "pine", "maple", "birch", "willow", "cedar", "palm", "elm", "ash", "spruce"],
}
JSON_KEYS = list(JSON_VALUES)
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}


def _word_count(rng: random.Random):
    topic, n = rng.choice(TOPICS), rng.randint(3, 7)
    return f"Write one sentence about {topic} that has exactly {n} words. Reply with the sentence only.", {"n": n}


def _arithmetic(rng: random.Random):
    op = rng.choice(["+", "-", "*"])
    a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "*" else (rng.randint(2, 30), rng.randint(2, 30))
    if op == "-" and b > a:
        a, b = b, a
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}? Reply with the number only.", {"answer": answer}


def _json_key(rng: random.Random):
    key = rng.choice(JSON_KEYS)
    value = rng.choice(JSON_VALUES[key])
    return (f'Reply with a JSON object whose key "{key}" has the value "{value}". Reply with the JSON only.',
            {"key": key, "value": value})


def _letters(rng: random.Random):
    word, kind = rng.choice(WORDS), rng.choice(["first", "last", "count"])
    if kind == "count":
        return f'How many letters are in the word "{word}"? Reply with the number only.', {"kind": kind, "word": word}
    return f'What is the {kind} letter of the word "{word}"? Reply with the letter only.', {"kind": kind, "word": word}


def _lake_path_exists(grid: list[str], start: tuple[int, int] = (0, 0)) -> bool:
    seen, frontier = {start}, [start]
    while frontier:
        r, c = frontier.pop()
        if grid[r][c] == "G":
            return True
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < len(grid) and 0 <= nc < len(grid[0]) and (nr, nc) not in seen and grid[nr][nc] != "H":
                seen.add((nr, nc))
                frontier.append((nr, nc))
    return False


def _frozen_lake(rng: random.Random):
    while True:
        cells = [["F"] * 4 for _ in range(4)]
        cells[0][0], cells[3][3] = "S", "G"
        free = [(r, c) for r in range(4) for c in range(4) if (r, c) not in ((0, 0), (3, 3))]
        for r, c in rng.sample(free, rng.randint(2, 4)):
            cells[r][c] = "H"
        grid = ["".join(row) for row in cells]
        if _lake_path_exists(grid):
            break
    lines = "\n".join(" ".join(row) for row in grid)
    # Shorter than the first version's instructions, and a format line that is NOT an answer (a 135M model
    # copies a complete example): measured 0/150 greedy either way (data/erl/README.md) — too hard for it.
    text = ("A 4x4 frozen lake, row 1 at the top:\n" + lines +
            "\nS is the start, G the goal, H a hole. Walk from S to G without stepping on H. Write the moves "
            "separated by commas, in this format (not the answer): down, right, right")
    return text, {"grid": grid}


def _guess_once(rng: random.Random):
    lo, width = rng.randint(1, 300), rng.choice([10, 20])
    hi = lo + width - 1
    return (f"I picked a whole number from {lo} to {hi}. Guess it in one try. Reply with the number only.",
            {"lo": lo, "hi": hi, "answer": rng.randint(lo, hi)})


def _digits(rng: random.Random):
    if rng.random() < 0.5:
        a, b, op = rng.randint(100, 999), rng.randint(100, 999), "+"
    else:
        a, b, op = rng.randint(12, 99), rng.randint(3, 9), "*"
    answer = a + b if op == "+" else a * b
    return f"What is {a} {op} {b}? Reply with the number only.", {"answer": answer}


def _lake3(rng: random.Random):
    """A 3×3 lake with the start and the goal anywhere and 1–2 holes, solvable."""
    while True:
        cells = [["F"] * 3 for _ in range(3)]
        start, goal = rng.sample([(r, c) for r in range(3) for c in range(3)], 2)
        cells[start[0]][start[1]], cells[goal[0]][goal[1]] = "S", "G"
        free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in (start, goal)]
        for r, c in rng.sample(free, rng.randint(1, 2)):
            cells[r][c] = "H"
        grid = ["".join(row) for row in cells]
        if _lake_path_exists(grid, start):
            break
    lines = "\n".join(" ".join(row) for row in grid)
    text = ("A 3x3 frozen lake, row 1 at the top:\n" + lines +
            "\nS is the start, G the goal, H a hole. Walk from S to G without stepping on H. Reply with the moves "
            "(up, down, left, right) separated by commas.")
    return text, {"grid": grid}


def _json_pair(rng: random.Random):
    k1, k2 = rng.sample(JSON_KEYS, 2)
    v1, v2 = rng.choice(JSON_VALUES[k1]), rng.choice(JSON_VALUES[k2])
    text = (f'Reply with a JSON object whose key "{k1}" has the value "{v1}" and whose key "{k2}" has the value '
            f'"{v2}". Reply with the JSON only.')
    return text, {"pairs": [[k1, v1], [k2, v2]]}


def _json_value(rng: random.Random):
    """The task's convention is not in the prompt: the word must sit under the key "value" (the feedback says so)."""
    key = rng.choice(JSON_KEYS)
    value = rng.choice(JSON_VALUES[key])
    return f'Reply with a JSON object for the {key} "{value}". Reply with the JSON only.', {"value": value}


GENERATORS = {"word_count": _word_count, "arithmetic": _arithmetic, "json_key": _json_key, "letters": _letters,
              "frozen_lake": _frozen_lake, "guess_once": _guess_once, "digits": _digits, "lake3": _lake3,
              "json_pair": _json_pair, "json_value": _json_value}

# ----------------------------------------------------------------------------------------------
# scoring: one function per task returns (reward in [0, 1], feedback sentence)


def _words(text: str) -> list[str]:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return [w for w in first.split() if re.search(r"[A-Za-z0-9]", w)]


def score_word_count(answer: str, spec: dict) -> tuple[float, str]:
    n, k = spec["n"], len(_words(answer))
    if k == n:
        return 1.0, f"Correct: your sentence had exactly {n} words."
    return max(0.0, 1.0 - abs(k - n) / n), f"Your sentence had {k} words; it needs exactly {n}."


def score_arithmetic(answer: str, spec: dict) -> tuple[float, str]:
    numbers = NUMBER.findall(answer)
    if not numbers:
        return 0.0, "Your reply contained no number; reply with the number in digits only."
    guess, target = int(numbers[-1]), spec["answer"]  # the last number: "7 + 5 = 12" answers 12
    if guess == target:
        return 1.0, f"Correct: {guess} is the answer."
    return 0.0, f"Your answer {guess} is too {'high' if guess > target else 'low'}."


def score_json_key(answer: str, spec: dict) -> tuple[float, str]:
    key, value = spec["key"], spec["value"]
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end <= start:
        return 0.0, "Your reply contains no JSON object; it must be like {\"" + key + "\": ...}."
    try:
        obj = json.loads(answer[start : end + 1])
    except json.JSONDecodeError as err:
        return 0.0, f"Your reply is not valid JSON ({err.msg.lower()})."
    if not isinstance(obj, dict):
        return 0.0, "Your JSON is not an object with keys."
    if key not in obj:
        return 0.5, f'Your JSON has no key "{key}"; it has {sorted(map(str, obj))}.'
    if str(obj[key]).strip().lower() != value.lower():
        return 0.5, f'Your key "{key}" has the value {json.dumps(obj[key])}; it must be "{value}".'
    return 1.0, "Correct: the JSON has the right key and value."


def score_letters(answer: str, spec: dict) -> tuple[float, str]:
    word, kind = spec["word"], spec["kind"]
    if kind == "count":
        numbers = NUMBER.findall(answer)
        if not numbers:
            return 0.0, "Your reply contained no number; reply with the count in digits."
        guess = int(numbers[-1])
        if guess == len(word):
            return 1.0, f'Correct: "{word}" has {guess} letters.'
        return 0.0, f'You said {guess}; that is too {"many" if guess > len(word) else "few"} letters for "{word}".'
    letters = re.findall(r"\b([A-Za-z])\b", answer) or re.findall(r"[A-Za-z]", answer)[:1]
    if not letters:
        return 0.0, "Your reply contained no letter; reply with a single letter."
    target = word[0] if kind == "first" else word[-1]
    if letters[0].lower() == target:
        return 1.0, f'Correct: "{target}" is the {kind} letter of "{word}".'
    return 0.0, f'"{letters[0]}" is not the {kind} letter of "{word}"; spell the word out and look again.'


def parse_moves(answer: str) -> list[str]:
    return [m.lower() for m in re.findall(r"\b(up|down|left|right)\b", answer, flags=re.IGNORECASE)]


def score_frozen_lake(answer: str, spec: dict) -> tuple[float, str]:
    grid, moves = spec["grid"], parse_moves(answer)
    if not moves:
        return 0.0, "Your reply had no moves; list moves such as: down, right, down."
    r, c = 0, 0
    start_distance = 6  # Manhattan distance from S (row 1, column 1) to G (row 4, column 4)
    for step, move in enumerate(moves, start=1):
        dr, dc = MOVES[move]
        if not (0 <= r + dr < 4 and 0 <= c + dc < 4):
            return 0.0, f"At step {step} you moved {move} off the edge of the map (from row {r + 1}, column {c + 1})."
        r, c = r + dr, c + dc
        if grid[r][c] == "H":
            return 0.0, f"You fell into a hole at step {step} (moving {move} onto row {r + 1}, column {c + 1})."
        if grid[r][c] == "G":
            return 1.0, f"Correct: you reached the goal in {step} moves."
    left = (3 - r) + (3 - c)
    return 0.5 * (1 - left / start_distance), (f"Your {len(moves)} moves ended at row {r + 1}, column {c + 1}, "
                                               f"still {left} steps from the goal; you need more moves.")


def _last_number(answer: str) -> int | None:
    numbers = NUMBER.findall(answer)
    return int(numbers[-1]) if numbers else None


def score_guess_once(answer: str, spec: dict) -> tuple[float, str]:
    guess, target = _last_number(answer), spec["answer"]
    if guess is None:
        return 0.0, f"Your reply contained no number; reply with one number from {spec['lo']} to {spec['hi']}."
    if guess == target:
        return 1.0, f"Correct: the number was {target}."
    if not spec["lo"] <= guess <= spec["hi"]:
        return 0.0, f"Your guess {guess} is outside {spec['lo']} to {spec['hi']}."
    return 0.0, f"Your guess {guess} is too {'high' if guess > target else 'low'}."


PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands"]


def score_digits(answer: str, spec: dict) -> tuple[float, str]:
    """Binary; the feedback names the wrong digits by place (ones, tens, ...) without giving them."""
    guess, target = _last_number(answer), spec["answer"]
    if guess is None:
        return 0.0, "Your reply contained no number; reply with the number in digits only."
    if guess == target:
        return 1.0, f"Correct: {target} is the answer."
    g, t = str(abs(guess))[::-1], str(target)[::-1]
    if len(g) != len(t):
        return 0.0, f"Your answer {guess} has {len(g)} digits; the answer has {len(t)}."
    wrong = [PLACES[i] for i in range(len(t)) if g[i] != t[i]]
    side = "high" if guess > target else "low"
    return 0.0, (f"Your answer {guess} is too {side}: "
                 f"its {' and '.join(wrong)} digit{'s are' if len(wrong) > 1 else ' is'} wrong.")


def score_lake3(answer: str, spec: dict) -> tuple[float, str]:
    """Binary: 1 at the goal, else 0; the feedback names the step, the move and the cell where the plan failed."""
    grid, moves = spec["grid"], parse_moves(answer)
    n = len(grid)
    r, c = next((i, row.index("S")) for i, row in enumerate(grid) if "S" in row)
    if not moves:
        return 0.0, "Your reply had no moves; reply with moves such as: down, right."
    for step, move in enumerate(moves, start=1):
        dr, dc = MOVES[move]
        if not (0 <= r + dr < n and 0 <= c + dc < n):
            return 0.0, f"Step {step}, {move}: you walked off the map from row {r + 1}, column {c + 1}."
        r, c = r + dr, c + dc
        if grid[r][c] == "H":
            return 0.0, f"Step {step}, {move}: you fell into the hole at row {r + 1}, column {c + 1}."
        if grid[r][c] == "G":
            return 1.0, f"Correct: you reached the goal in {step} moves."
    gr, gc = next((i, row.index("G")) for i, row in enumerate(grid) if "G" in row)
    return 0.0, (f"Your {len(moves)} moves stopped at row {r + 1}, column {c + 1}; the goal is at row {gr + 1}, "
                 f"column {gc + 1}.")


def score_json_pair(answer: str, spec: dict) -> tuple[float, str]:
    """Binary: 1 when both keys have their values; the feedback names the first fault."""
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end <= start:
        return 0.0, "Your reply contains no JSON object."
    try:
        obj = json.loads(answer[start : end + 1])
    except json.JSONDecodeError as err:
        return 0.0, f"Your reply is not valid JSON ({err.msg.lower()})."
    if not isinstance(obj, dict):
        return 0.0, "Your JSON is not an object with keys."
    for key, value in spec["pairs"]:
        if key not in obj:
            return 0.0, f'Your JSON has no key "{key}"; it has {sorted(map(str, obj))}.'
        if str(obj[key]).strip().lower() != value.lower():
            return 0.0, f'Your key "{key}" has the value {json.dumps(obj[key])}; it must be "{value}".'
    return 1.0, "Correct: both keys have the right values."


def score_json_value(answer: str, spec: dict) -> tuple[float, str]:
    """Binary: 1 when the JSON object holds the word under the key "value" — a rule only the feedback states."""
    value = spec["value"]
    start, end = answer.find("{"), answer.rfind("}")
    rule = f'this task wants {{"value": "{value}"}}.'
    if start < 0 or end <= start:
        return 0.0, f"Your reply contains no JSON object; {rule}"
    try:
        obj = json.loads(answer[start : end + 1])
    except json.JSONDecodeError as err:
        return 0.0, f"Your reply is not valid JSON ({err.msg.lower()}); {rule}"
    if not isinstance(obj, dict) or "value" not in obj:
        return 0.0, f'Your JSON has no key "value"; {rule}'
    if str(obj["value"]).strip().lower() != value.lower():
        return 0.0, f'Your key "value" holds {json.dumps(obj["value"])}; {rule}'
    return 1.0, f'Correct: "{value}" is under the key "value".'


SCORERS = {"word_count": score_word_count, "arithmetic": score_arithmetic, "json_key": score_json_key,
           "letters": score_letters, "frozen_lake": score_frozen_lake, "guess_once": score_guess_once,
           "digits": score_digits, "lake3": score_lake3, "json_pair": score_json_pair, "json_value": score_json_value}


CUT_OFF = "Cut off at the length limit; be shorter."


def score(task: str, answer: str, spec: dict | str, truncated: bool = False) -> tuple[float, str]:
    """(reward in [0, 1], feedback sentence) of ``answer`` on one instance.

    ``truncated``: the reply hit the token cap before it ended. The reward is unchanged (it scores the text
    as it is); the feedback then starts by saying so, since a cut-off answer ("{\"animal\": {\"name\": ...")
    otherwise gets a misleading diagnosis ("contains no JSON object").
    """
    if task not in SCORERS:
        raise ValueError(f"unknown feedback task {task!r}; use one of {TASKS}")
    reward, feedback = SCORERS[task](answer, json.loads(spec) if isinstance(spec, str) else spec)
    if truncated and reward < 1.0:
        feedback = f"{CUT_OFF} {feedback}"
    return reward, feedback


# ----------------------------------------------------------------------------------------------
# TRL-style functions: dataset columns arrive as keyword lists (task, spec), one entry per completion


def completion_text(completion) -> str:
    """A TRL completion as text: plain strings pass through, chat completions give their last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of chat messages, got {completion!r:.80}")


def _scores(completions, task, spec, truncated=None) -> list[tuple[float, str]]:
    if task is None or spec is None:
        raise ValueError("feedback tasks need the dataset columns 'task' and 'spec' (load the data with load_split())")
    truncated = [False] * len(completions) if truncated is None else list(truncated)
    if not (len(completions) == len(task) == len(spec) == len(truncated)):
        raise ValueError(f"got {len(completions)} completions for {len(task)} tasks, {len(spec)} specs and "
                         f"{len(truncated)} truncation flags")
    return [score(t, completion_text(c), s, bool(cut)) for c, t, s, cut in zip(completions, task, spec, truncated)]


def reward_func(prompts, completions, task=None, spec=None, **kwargs) -> list[float]:
    """TRL reward function: one reward in [0, 1] per completion."""
    return [r for r, _ in _scores(completions, task, spec)]


def feedback_func(prompts, completions, task=None, spec=None, truncated=None, **kwargs) -> list[str]:
    """ERL feedback function: one sentence per completion saying what was wrong (or that it was right).

    ``truncated`` (one bool per completion, passed by ``ERLTrainer``): the completion hit the token cap; the
    feedback then says the reply was cut off."""
    return [f for _, f in _scores(completions, task, spec, truncated)]


# ----------------------------------------------------------------------------------------------
# the data files and the datasets built from them


def generate(seed: int = 0, n_train: int = 400, n_eval: int = 150,
             tasks: Sequence[str] = TASKS) -> dict[str, list[dict]]:
    """Distinct instances per task, split into train and eval (no prompt appears in both).

    Each family puts ``n_eval`` instances in eval (enough for a paired interval of about ±0.1 on a success
    rate) and up to ``n_train`` of the rest in train; a family needs at least 2 × ``n_eval`` distinct prompts.
    """
    rng = random.Random(seed)
    splits = {"train": [], "eval": []}
    for task in tasks:
        seen, rows, tries = set(), [], 0
        while len(rows) < n_train + n_eval and tries < 100 * (n_train + n_eval):
            tries += 1
            prompt, spec = GENERATORS[task](rng)
            if prompt not in seen:
                seen.add(prompt)
                rows.append({"task": task, "prompt": prompt, "spec": json.dumps(spec)})
        if len(rows) < 2 * n_eval:
            raise ValueError(f"{task}: only {len(rows)} distinct prompts, fewer than 2 × n_eval = {2 * n_eval}")
        rng.shuffle(rows)
        splits["eval"] += rows[:n_eval]
        splits["train"] += rows[n_eval:]
    return splits


def write(folder: str | Path = DATA_DIR, seed: int = 0, n_train: int = 400, n_eval: int = 150) -> dict[str, int]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in generate(seed, n_train, n_eval).items():
        with open(folder / f"{split}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        counts[split] = len(rows)
    return counts


def read_rows(split: str = "train", tasks: Sequence[str] | str | None = None,
              folder: str | Path = DATA_DIR) -> list[dict]:
    path = Path(folder) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python -m rlnlp.envs.feedback_tasks`")
    tasks = [tasks] if isinstance(tasks, str) else tasks
    unknown = set(tasks or []) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown feedback task(s) {sorted(unknown)}; use some of {TASKS}")
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from err
            if not tasks or row["task"] in tasks:
                rows.append(row)
    return rows


def load_split(split: str = "train", tasks: Sequence[str] | str | None = None, limit: int | None = None,
               folder: str | Path = DATA_DIR):
    """A ``datasets.Dataset`` with TRL's conversational ``prompt`` column plus ``task`` and ``spec``."""
    from datasets import Dataset

    rows = read_rows(split, tasks, folder)[:limit]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "task": r["task"],
                               "spec": r["spec"]}
                              for r in rows])


def load_splits(tasks: Sequence[str] | str | None = None, folder: str | Path = DATA_DIR):
    """``DatasetDict`` with ``train`` and ``eval``."""
    from datasets import DatasetDict

    return DatasetDict({s: load_split(s, tasks, folder=folder) for s in ("train", "eval")})


class FeedbackTaskEnv:
    """The shared protocol over one split: ``reset(seed)`` picks an instance, ``step(answer)`` scores it and ends.

    The observation after ``step`` is the feedback sentence (what a multi-turn agent would read next).
    """

    actions = None

    def __init__(self, tasks: Sequence[str] | str | None = None, split: str = "train", folder: str | Path = DATA_DIR):
        self.rows = read_rows(split, tasks, folder)
        if not self.rows:
            raise ValueError(f"no {split} instances for tasks {tasks!r} in {folder}")
        self.row: dict | None = None

    def reset(self, seed: int | None = None) -> str:
        self.row = random.Random(seed).choice(self.rows)
        return self.row["prompt"]

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.row is None:
            raise RuntimeError("FeedbackTaskEnv.step() called before reset()")
        reward, feedback = score(self.row["task"], action, self.row["spec"])
        info = {"task": self.row["task"], "feedback": feedback}
        self.row = None
        return feedback, reward, True, info


PROG = "python -m rlnlp.envs.feedback_tasks"


def _main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description="Regenerate data/erl/{train,eval}.jsonl (seeded).")
    parser.add_argument("--out", default=str(DATA_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=positive_int, default=400, help="train instances per task (at most)")
    parser.add_argument("--n-eval", type=positive_int, default=150, help="eval instances per task")
    args = parser.parse_args(argv)
    counts = write(args.out, args.seed, args.n_train, args.n_eval)
    print(f"wrote {counts} rows to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad option or an unwritable --out is one line and exit status 2."""
    return run(_main, argv, prog=PROG)


if __name__ == "__main__":
    raise SystemExit(main())
