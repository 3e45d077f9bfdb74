"""Twenty Questions with a local oracle (no LM): the multi-turn environment of ArCHer's paper, on our table.

The environment picks a secret object from data/twenty_questions/ (149 everyday objects in 17
categories × 20 yes/no attribute questions, see ``rlnlp.data.twenty_questions``), or from a
smaller candidate set. Each turn the agent asks one free-text question. The oracle:

1. detects a guess — the question names an object of the table after a guessing phrase ("Is it a
   dog?", "My guess is a dog"; not "Is it bigger than a dog?"); naming the secret ends the
   episode, naming one other object is answered "No.", naming several is refused;
2. otherwise strips a negation ("Is it not alive?" asks the opposite of "Is it alive?"; "Isn't it
   alive?" asks the same thing, expecting yes) and matches the positive question, by MiniLM
   cosine similarity, against a bank of phrasings (``phrasing_bank``), each tied to one meaning:
   * one of the table's 20 attribute questions (its text and a few hand-written variants),
   * a **category** question answered from the table's category column ("Is it an animal?" is
     yes for birds, insects and bugs, mammals and water animals; "Is it alive?" also for plants),
   * an **off-table anchor** ("Is it purple?", "Does it have a handle?"): questions the table
     cannot answer, so that an off-table question finds its nearest neighbour among them;
3. answers "Yes."/"No." only when the best match is at least ``threshold`` AND beats the best
   match of every OTHER meaning by ``margin`` (two meanings that fit equally well — a compound
   question, a near miss — get "I don't know.", as does an off-table anchor).

``score_paraphrases`` scores the oracle on data/twenty_questions/paraphrases.json: natural
paraphrases written by hand, separately from the phrasing bank, each with the meaning a person
gives it (or null: the oracle cannot know). Reward −1 per turn, 0 and done on a correct guess, at
most ``max_turns`` turns, so returns lie in [−max_turns, 0] (ArCHer's scheme).

Variants that put the game within a 135M policy's reach (``TwentyQuestions`` arguments):
``candidates`` (the secret is one of a few named objects, listed in the intro), ``question_menu``
(a few questions the oracle understands, listed in the intro) and ``prefill`` (the agent's turn
starts with "Is it", so the policy only completes the question).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

GUESS_LEAD = (r"\b(?:is it|it is|it's|is this|are you thinking of|could it be|would it be|my guess is|i guess|"
              r"or)\s+(?:(?:a|an|the|some|one)\s+)?")
INTRO = ("Let's play Twenty Questions. I am thinking of an everyday object. Ask me one yes/no question "
         "at a time to find out what it is, and guess it by asking \"Is it a <object>?\".")

ANIMALS = ("bird", "insect_or_bug", "mammal", "water_animal")
CATEGORY_QUESTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # meaning: (table categories answered "yes", phrasings). Judgement calls follow the table's
    # categories: "clothing" includes its jewellery, glasses and helmet; "alive" = animals + plants;
    # fruit and vegetables are not "plants" (they are food); "insect" is the table's insect_or_bug.
    "animal": (ANIMALS, ("Is it an animal?", "Is it a kind of animal?", "Is it a living creature?", "Is it a beast?")),
    "alive": (ANIMALS + ("plant",), ("Is it alive?", "Is it a living thing?", "Is it a life form?", "Is it living?")),
    "plant": (("plant",), ("Is it a plant?", "Is it a type of plant?", "Is it a flower, tree or other plant?")),
    "fruit": (("fruit",), ("Is it a fruit?", "Is it a kind of fruit?")),
    "vegetable": (("vegetable",), ("Is it a vegetable?", "Is it a kind of vegetable?")),
    "mammal": (("mammal",), ("Is it a mammal?", "Is it a kind of mammal?")),
    "bird": (("bird",), ("Is it a bird?", "Is it a type of bird?")),
    "insect": (("insect_or_bug",), ("Is it an insect?", "Is it an insect or a bug?", "Is it a small crawling bug?")),
    "vehicle": (("vehicle",), ("Is it a vehicle?", "Is it used for transport?", "Can people ride in it to travel?",
                               "Is it a way of getting around?")),
    "clothing": (("clothing",), ("Is it clothing?", "Is it an item of clothing or jewellery?", "Is it a garment?",
                                 "Is it an accessory or clothes?")),
    "electronics": (("electronics",), ("Is it an electronic device?", "Is it a piece of electronics?",
                                       "Is it an electronic gadget?")),
    "furniture": (("furniture",), ("Is it furniture?", "Is it a piece of furniture?")),
    "tool": (("tool",), ("Is it a tool?", "Is it a kind of tool?", "Is it a hand tool or a garden tool?")),
    "instrument": (("musical_instrument",), ("Is it a musical instrument?", "Is it an instrument for music?",
                                             "Do you play music with it?")),
    "toy": (("toy_or_sport",), ("Is it a toy?", "Is it a toy or sports gear?", "Is it sporting equipment?",
                                "Is it something for a game or a sport?")),
    "kitchen": (("kitchen_item",), ("Is it a kitchen item?", "Is it a kitchen tool or appliance?",
                                    "Is it something used for cooking?")),
}
ATTRIBUTE_VARIANTS: dict[str, tuple[str, ...]] = {
    # extra phrasings of the table's questions, by attribute (the paraphrase TEST set is a separate file)
    "made_by_people": ("Is it made by humans?", "Is it man-made?", "Is it manufactured?", "Was it made in a factory?",
            "Is it a human-made thing?"),
    "found_indoors": ("Is it found indoors?", "Is it used inside the house?", "Is it kept in the home?",
            "Is it an indoor object?"),
    "has_legs": ("Does it have legs?", "Has it got legs?", "Does it walk on legs?"),
    "eats_animals": ("Does it eat other animals?", "Does it eat meat?", "Is it a meat eater?", "Is it a carnivore?",
            "Does it hunt?"),
    "can_fly": ("Can it fly?", "Does it fly?", "Is it able to fly?", "Can it go up in the air?"),
    "water": ("Does it live in water?", "Is it found in water?", "Does it travel on water?", "Is it in the sea?",
            "Does it live in the ocean or a lake?"),
    "food_or_drink": ("Is it food?", "Can you eat it?", "Is it eaten?", "Is it something to drink?",
            "Can it be eaten?"),
    "sweet": ("Is it sweet?", "Does it taste sweet?", "Is it sugary?"),
    "green": ("Is it green?", "Is it green coloured?", "Is it the colour green?"),
    "smaller_than_walnut": ("Is it smaller than a walnut?", "Is it very tiny?", "Is it smaller than a nut?"),
    "fits_in_one_hand": ("Can you hold it in one hand?", "Does it fit in your hand?", "Is it small enough to hold?",
            "Can it be held in a hand?"),
    "bigger_than_shoebox": ("Is it bigger than a shoebox?", "Is it larger than a shoebox?", "Is it bigger than a box?"),
    "bigger_than_person": ("Is it bigger than a person?", "Is it larger than a human?", "Is it bigger than an adult?",
            "Is it taller than a person?"),
    "long_and_thin": ("Is it long and thin?", "Is it long and slim?", "Is it a long, thin shape?"),
    "round": ("Is it round?", "Is it shaped like a sphere?", "Is it shaped like a disc?", "Is it circular?"),
    "needs_power": ("Does it need electricity?", "Does it need fuel?", "Does it use power?", "Is it electric?",
            "Does it need electricity or fuel?"),
    "mostly_metal": ("Is it made of metal?", "Is it metal?", "Is it mostly metal?"),
    "mostly_fabric": ("Is it made of cloth?", "Is it made of fabric?", "Is it fabric?"),
    "worn_on_body": ("Is it worn on the body?", "Do you wear it?", "Is it something you wear?", "Can it be worn?"),
    "play_sport_music": ("Is it used for play, sport or music?", "Is it for playing?", "Do you play with it?",
            "Is it for games, sport or music?"),
}
OFF_TABLE_ANCHORS: tuple[str, ...] = (
    # questions the table cannot answer (colours other than green, materials other than metal and
    # cloth, parts, value, age, origin, temperature, taste other than sweet, open questions)
    "Is it purple?", "Is it yellow?", "Is it white or black?", "Is it made of paper?", "Is it made of stone?",
    "Is it made of rubber?", "Does it have a handle?", "Does it have eyes?", "Does it have feathers?",
    "Does it have a screen?", "Is it cheap?", "Is it rare?", "Is it new?", "Is it ancient?", "Is it cold?",
    "Is it smelly?", "Is it quiet?", "Is it shiny?", "Is it sharp?", "Is it a place?", "Is it a person?",
    "Is it an idea?", "Is it from Asia?", "Is it American?", "Does it smell nice?", "Is it salty?", "Is it fun?",
    "Is it useful?", "Is it beautiful?", "Which shape is it?", "What does it do?", "How heavy is it?",
    "Do I own one?", "Is it bigger than a house?", "Is it faster than a horse?", "Is it light?", "Is it hard?",
)
NEGATIVE_LEAD = re.compile(r"^(isn't|aren't|doesn't|don't|can't|cannot|won't|wouldn't|couldn't|hasn't|haven't)\b")
POSITIVE_OF = {"isn't": "is", "aren't": "are", "doesn't": "does", "don't": "do", "can't": "can", "cannot": "can",
               "won't": "will", "wouldn't": "would", "couldn't": "could", "hasn't": "has", "haven't": "have"}
NEGATION = re.compile(r"\b(?:not|never)\b\s*|n't\b")


@dataclass
class Reading:
    """How the oracle reads one question."""

    kind: str  # "attribute" | "category" | "unknown"
    meaning: str | None  # "q05", "cat:animal", or None
    negated: bool
    similarity: float  # to the best phrasing
    margin: float  # best similarity minus the best similarity of any other meaning
    matched: str  # the phrasing it matched


def strip_negation(question: str) -> tuple[str, bool]:
    """(the positive question, whether the question asks the opposite).

    "Isn't it alive?" / "Doesn't it fly?" lead with a contracted negation: they ask the positive
    question expecting "yes", so they are answered as "Is it alive?" (not negated). A "not" / "n't"
    anywhere else ("Is it not alive?", "Does it not fly?", "It can't fly, can it?") flips the answer.
    """
    text = " ".join(question.lower().replace("’", "'").split())
    lead = NEGATIVE_LEAD.match(text)
    if lead:
        text = POSITIVE_OF[lead.group(1)] + text[lead.end():]
    negated = bool(NEGATION.search(text))
    text = NEGATION.sub("", text)
    text = re.sub(r"\bca\b", "can", re.sub(r"\bwo\b", "will", text))  # "can't" -> "ca", "won't" -> "wo" after n't
    return " ".join(text.split()), negated


def phrasing_bank(questions: list[dict]) -> list[tuple[str, str | None]]:
    """Every phrasing the oracle matches against, with its meaning (None = off the table)."""
    bank = [(q["question"], q["id"]) for q in questions]
    bank += [(text, q["id"]) for q in questions for text in ATTRIBUTE_VARIANTS.get(q.get("attribute"), ())]
    bank += [(text, f"cat:{name}") for name, (_, texts) in CATEGORY_QUESTIONS.items() for text in texts]
    bank += [(text, None) for text in OFF_TABLE_ANCHORS]
    return bank


class Oracle:
    """Answers free-text questions about a secret object from the attribute table and its categories."""

    def __init__(self, questions: list[dict], objects: list[dict], encoder=None, threshold: float = 0.7,
                 margin: float = 0.02, categories: bool = True):
        from ..models import TextEncoder

        if not questions or not objects:
            raise ValueError("the oracle needs at least one question and one object")
        self.questions, self.objects, self.threshold, self.margin = questions, objects, threshold, margin
        self.encoder = encoder or TextEncoder()
        self.question_texts = [q["question"] for q in questions]
        known = {o["category"] for o in objects}
        bank = phrasing_bank(questions)
        if not categories:
            bank = [(t, m) for t, m in bank if not (m or "").startswith("cat:")]
        # a category meaning is kept only if the table has at least one of its categories
        self.bank = [(t, m) for t, m in bank if not (m or "").startswith("cat:")
                     or set(CATEGORY_QUESTIONS[m[4:]][0]) & known]
        self.bank_meanings = [m for _, m in self.bank]
        self.bank_emb = self.encoder.embed([strip_negation(t)[0] for t, _ in self.bank])  # (K, D), normalised
        self.by_id = {q["id"]: q for q in questions}
        # longest names first, so "tennis ball" wins over "ball"; an optional plural s/es. A name
        # counts only right after a guessing phrase: "Is it a car?" guesses, "Is it bigger than a
        # car?" does not.
        names = sorted({o["object"].lower() for o in objects}, key=len, reverse=True)
        self._name_patterns = [(n, re.compile(GUESS_LEAD + re.escape(n) + r"(?:e?s)?\b")) for n in names]

    def named_objects(self, question: str) -> list[str]:
        """Objects the question guesses (non-overlapping, longest match first)."""
        text, found = question.lower(), []
        for name, pattern in self._name_patterns:
            match = pattern.search(text)
            if match:
                found.append(name)
                text = text[: match.start()] + " " * (match.end() - match.start()) + text[match.end():]
        return found

    def read(self, question: str) -> Reading:
        """Match the positive form of ``question`` to the phrasing bank: meaning, negation, similarity, margin."""
        positive, negated = strip_negation(question)
        sims = (self.encoder.embed([positive])[0] @ self.bank_emb.T).tolist()  # (K,)
        best_by_meaning: dict = {}
        for sim, (text, meaning) in zip(sims, self.bank):
            if sim > best_by_meaning.get(meaning, (-2.0, ""))[0]:
                best_by_meaning[meaning] = (sim, text)
        ranked = sorted(best_by_meaning.items(), key=lambda kv: -kv[1][0])
        (meaning, (sim, text)) = ranked[0]
        margin = sim - ranked[1][1][0] if len(ranked) > 1 else 1.0
        confident = meaning is not None and sim >= self.threshold and margin >= self.margin
        kind = ("category" if meaning.startswith("cat:") else "attribute") if confident else "unknown"
        return Reading(kind, meaning if confident else None, negated, round(sim, 3), round(margin, 3), text)

    def truth(self, meaning: str, secret: dict) -> bool:
        """The table's answer for one meaning ("q05" or "cat:animal")."""
        if meaning.startswith("cat:"):
            return secret["category"] in CATEGORY_QUESTIONS[meaning[4:]][0]
        return bool(secret["answers"][meaning])

    def answer(self, question: str, secret: dict) -> tuple[str, dict]:
        """The oracle's reply and what it decided: {"kind": guess|attribute|category|unknown, "correct", ...}."""
        named = self.named_objects(question)
        if len(named) == 1:
            correct = named[0] == secret["object"].lower()
            return ("Yes! You got it." if correct else "No."), {"kind": "guess", "guess": named[0], "correct": correct}
        if len(named) > 1:
            return "Please guess one object at a time.", {"kind": "guess", "guess": named, "correct": False}
        r = self.read(question)
        info = {"kind": r.kind, "meaning": r.meaning, "negated": r.negated, "matched": r.matched,
                "similarity": r.similarity, "margin": r.margin, "correct": False}
        if r.meaning is None:
            return "I don't know.", info
        yes = self.truth(r.meaning, secret) != r.negated
        return ("Yes." if yes else "No."), info


def load_paraphrases(path=None) -> list[dict]:
    """The hand-written paraphrase test set: [{"question", "means": "q05" | "cat:animal" | None, "negated"}]."""
    from ..data import data_dir

    path = path or data_dir() / "twenty_questions" / "paraphrases.json"
    return json.loads(open(path, encoding="utf-8").read())


def score_paraphrases(oracle: Oracle, rows: list[dict] | None = None) -> dict:
    """Score the oracle on paraphrases, over every (question, object) pair of the table.

    accuracy:            on-table questions answered with the right yes/no (a "don't know" is not right)
    wrong:               on-table questions answered with the WRONG yes/no (worse than "don't know")
    off_table_confident: off-table questions (means None) that got a yes/no instead of "I don't know."
    Also the per-question readings, for inspection.
    """
    rows = rows if rows is not None else load_paraphrases()
    right = wrong = total = confident_off = off = 0
    details = []
    for row in rows:
        r = oracle.read(row["question"])
        details.append({**row, "read_as": r.meaning, "read_negated": r.negated, "similarity": r.similarity,
                        "margin": r.margin, "matched": r.matched})
        if row["means"] is None:
            off += 1
            confident_off += r.meaning is not None
            continue
        for obj in oracle.objects:
            total += 1
            if r.meaning is None:
                continue
            expected = oracle.truth(row["means"], obj) != bool(row.get("negated"))
            given = oracle.truth(r.meaning, obj) != r.negated
            right += given == expected
            wrong += given != expected
    return {"accuracy": right / max(total, 1), "wrong": wrong / max(total, 1),
            "off_table_confident": confident_off / max(off, 1), "on_table_questions": len(rows) - off,
            "off_table_questions": off, "details": details}


class TwentyQuestions:
    """The game as a text environment (``reset(seed) -> observation``, ``step(question)``).

    candidates:    object names the secret is drawn from (None = the whole table); ``show_candidates``
                   lists them in the intro
    question_menu: how many of the table's questions to list in the intro as examples (0 = none)
    prefill:       text the agent's turn starts with (e.g. "Is it"): the observation is then the
                   rendered chat with the assistant turn opened and ``prefill`` written (``chat`` False,
                   which needs ``tokenizer``), and the question asked is ``prefill`` + the utterance
    """

    actions = None

    def __init__(self, oracle: Oracle | None = None, max_turns: int = 20, objects: list[dict] | None = None,
                 questions: list[dict] | None = None, encoder=None, threshold: float = 0.7, margin: float = 0.02,
                 candidates: list[str] | None = None, show_candidates: bool = True, question_menu: int = 0,
                 prefill: str = "", tokenizer=None):
        if oracle is None:
            if objects is None or questions is None:
                from ..data import twenty_questions

                questions, objects = twenty_questions()
            oracle = Oracle(questions, objects, encoder=encoder, threshold=threshold, margin=margin)
        self.oracle, self.max_turns = oracle, max_turns
        by_name = {o["object"]: o for o in oracle.objects}
        if candidates:
            missing = [c for c in candidates if c not in by_name]
            if missing:
                raise ValueError(f"candidates not in the Twenty Questions table: {missing}")
        self.pool = [by_name[c] for c in candidates] if candidates else list(oracle.objects)
        self.show_candidates = bool(candidates) and show_candidates
        self.question_menu = question_menu
        self.prefill = prefill
        self.tokenizer = tokenizer
        if prefill and tokenizer is None:
            raise ValueError("prefill needs the policy's tokenizer (the observation carries the chat template)")
        self.chat = not prefill
        self.secret: dict = {}
        self.history: list[tuple[str, str]] = []
        self.facts: list[tuple[str, bool]] = []  # (meaning, the table's answer) for each answered question
        self.done = True

    def clone(self) -> "TwentyQuestions":
        """A fresh environment with the same settings, sharing the oracle (its embeddings)."""
        return TwentyQuestions(oracle=self.oracle, max_turns=self.max_turns,
                               candidates=[o["object"] for o in self.pool] if len(self.pool) < len(self.oracle.objects)
                               else None, show_candidates=self.show_candidates, question_menu=self.question_menu,
                               prefill=self.prefill, tokenizer=self.tokenizer)

    def intro(self) -> str:
        lines = [INTRO]
        if self.question_menu:
            lines.append("Questions I can answer include: " +
                         " ".join(self.oracle.question_texts[: self.question_menu]))
        return "\n".join(lines)

    def observation(self) -> str:
        lines = [self.intro()]
        if self.history:
            lines.append("So far:")
            lines += [f"{i + 1}. {q} {a}" for i, (q, a) in enumerate(self.history)]
        if self.show_candidates:  # last, next to the request: a 135M model reads the end of its prompt best
            lines.append("The object is one of: " + ", ".join(o["object"] for o in self.pool) + ".")
        lines.append(f"You have {self.max_turns - len(self.history)} questions left. "
                     "Reply with your next yes/no question only.")
        text = "\n".join(lines)
        if not self.prefill:
            return text
        from ..sampling import render_prompts

        return render_prompts(self.tokenizer, [text])[0] + self.prefill

    def reset(self, seed: int | None = None) -> str:
        self.secret = random.Random(seed).choice(self.pool)
        self.history, self.facts, self.done = [], [], False
        return self.observation()

    def state(self) -> dict:
        """What a checkpoint needs to continue this episode."""
        return {"secret": self.secret.get("object"), "history": [list(h) for h in self.history],
                "facts": [list(f) for f in self.facts], "done": self.done}

    def load_state(self, state: dict) -> None:
        by_name = {o["object"]: o for o in self.oracle.objects}
        self.secret = by_name[state["secret"]] if state["secret"] else {}
        self.history, self.done = [tuple(h) for h in state["history"]], state["done"]
        self.facts = [tuple(f) for f in state.get("facts", [])]

    # ---- reference policies (they play the same episodes as a learner: reset(seed) fixes the secret) ----

    def remaining(self) -> list[str]:
        """Candidates the answers so far have not ruled out (a wrong guess rules its object out)."""
        wrong = {q for q, a in self.history if a == "No."}
        left = []
        for o in self.pool:
            if any(self.oracle.truth(m, o) != yes for m, yes in self.facts):
                continue
            if any(self.oracle.named_objects(q) == [o["object"].lower()] for q in wrong):
                continue
            left.append(o["object"])
        return left

    def moves(self) -> list[str]:
        """Utterances the oracle understands, written after ``prefill``: the table's and the category questions
        that start with it (all of them without a prefill), and a guess of each candidate."""
        lead = self.prefill.strip()
        texts = list(dict.fromkeys(self.oracle.question_texts + [t for _, (_, ts) in CATEGORY_QUESTIONS.items()
                                                                  for t in ts[:1]]))
        meanings = {t: m for t, m in self.oracle.bank}
        questions = [t for t in texts if t in meanings and meanings[t] is not None and t.startswith(lead)]
        guesses = [f"Is it a {o['object']}?" for o in self.pool]
        return [t[len(lead):] for t in questions + guesses if t.startswith(lead)]

    def _meaning(self, move: str) -> str | None:
        return dict(self.oracle.bank).get(" ".join((self.prefill + move).split()))

    def eliminate(self) -> str:
        """The scripted optimum: ask the understood question that splits the remaining candidates most evenly;
        guess when one is left or no question splits them."""
        left = self.remaining() or [o["object"] for o in self.pool]
        objs = [o for o in self.pool if o["object"] in left]
        best, best_gap = None, len(objs)
        if len(objs) > 1:
            for move in self.moves():
                m = self._meaning(move)
                if m is None:
                    continue
                yes = sum(self.oracle.truth(m, o) for o in objs)
                gap = abs(2 * yes - len(objs))
                if 0 < yes < len(objs) and gap < best_gap:
                    best, best_gap = move, gap
        if best is not None:
            return best
        lead = self.prefill.strip()
        return f"Is it a {left[0]}?"[len(lead):]

    def random_valid(self, rng: random.Random) -> str:
        """A uniform move among those the oracle understands that were not made before (ignores the answers)."""
        asked = {q for q, _ in self.history}
        fresh = [m for m in self.moves() if " ".join((self.prefill + m).split()) not in asked]
        return rng.choice(fresh or self.moves())

    def random_consistent(self, rng: random.Random) -> str:
        """Guess a uniform candidate that is not ruled out (never asks about a ruled-out candidate; asks nothing)."""
        lead = self.prefill.strip()
        return f"Is it a {rng.choice(self.remaining() or [o['object'] for o in self.pool])}?"[len(lead):]

    @staticmethod
    def split(utterance: str) -> bool:
        return "?" in utterance or "\n" in utterance

    def step(self, question: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        if self.tokenizer is not None and self.tokenizer.eos_token:  # a raw-text utterance ended by EOS carries it
            question = question.replace(self.tokenizer.eos_token, " ")
        question = " ".join((self.prefill + question).split()) or "(nothing)"
        ruled_out = [o["object"] for o in self.pool if o["object"] not in self.remaining()]
        reply, info = self.oracle.answer(question, self.secret)
        info["repeated"] = any(q == question for q, _ in self.history)
        info["ruled_out_guess"] = info["kind"] == "guess" and info["guess"] in ruled_out
        self.history.append((question, reply))
        if info["kind"] in ("attribute", "category"):
            self.facts.append((info["meaning"], self.oracle.truth(info["meaning"], self.secret)))
        correct = info["correct"]
        self.done = correct or len(self.history) >= self.max_turns
        info.update(secret=self.secret["object"], turn=len(self.history), reply=reply)
        if self.done:
            info["success"] = correct
        return self.observation(), 0.0 if correct else -1.0, self.done, info
