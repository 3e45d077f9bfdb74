"""Print every recorded headline result of a profile as one markdown table.

    python -m rlnlp.scoreboard                   # the active profile (cpu without CUDA)
    python -m rlnlp.scoreboard --profile full
    python -m rlnlp.scoreboard --profile cpu --readme README.md   # also paste it into the README

"learns?" says **yes** only when the 95% interval of method − baseline lies wholly on the good
side of zero, **worse** when wholly on the bad side, **no** when it straddles zero; reference rows
(a fixed baseline gap, nothing trained) show "—".
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from .cli import Parser, run
from .results import load_rows, results_dir
from .runtime import PROFILES

COLUMNS = ["system", "task", "metric", "method", "baseline", "method − baseline [95% CI]", "n", "learns?", "wall",
           "run"]


def _num(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _signed(x: float) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:+.3g}"


def units(unit: str, n: int) -> str:
    """'held-out route' → 'held-out routes'; the noun before a parenthesis takes the s:
    'episode (same seed)' → 'episodes (same seed)'."""
    head, sep, tail = unit.partition(" (")
    if n != 1 and not head.endswith("s"):
        head += "s"
    return head + sep + tail


def row_cells(r: dict) -> list[str]:
    verdict = r.get("verdict", "no")
    better = "↑" if r.get("higher_is_better", True) else "↓"
    return [
        r["system"], r["task"], f"{r['metric']} ({better})", f"{r['method']} {_num(r['value'])}",
        f"{r['baseline']} {_num(r['baseline_value'])}",
        f"{_signed(r['difference'])} [{_signed(r['low'])}, {_signed(r['high'])}]",
        f"{r['n']} {units(r['unit'], r['n'])}",
        f"**{verdict}**" if verdict == "yes" else verdict,
        f"{r['wall_s'] / 60:.1f} min", f"{r['date']} {r['commit']}",
    ]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row_cells(r)) + " |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    devices = sorted({r["device"] for r in rows})
    dates = sorted({r["date"] for r in rows})
    systems = sorted({r["system"] for r in rows if r.get("claim") != "reference"})
    learned = sorted({r["system"] for r in rows if r.get("verdict") == "yes" and r.get("claim") == "learning"})
    span = dates[0] if len(dates) == 1 else f"{dates[0]} … {dates[-1]}"
    return (f"{len(rows)} rows from {span} on {', '.join(devices)}; "
            f"an interval excluding zero in the good direction for {len(learned)} of {len(systems)} systems "
            f"({', '.join(learned) or 'none'}).")


def paste_into(readme: Path, prof: str, text: str) -> None:
    """Replace the block between ``<!-- scoreboard:PROF -->`` and ``<!-- /scoreboard:PROF -->``."""
    start, end = f"<!-- scoreboard:{prof} -->", f"<!-- /scoreboard:{prof} -->"
    body = readme.read_text()
    if start not in body or end not in body:
        raise ValueError(f"{readme} has no '{start}' … '{end}' block to replace")
    new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{text}\n{end}", body, flags=re.S)
    readme.write_text(new)


PROG = "python -m rlnlp.scoreboard"


def _main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default=None,
                        help="which results folder (default: the active profile)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also paste the table into this README's scoreboard block")
    args = parser.parse_args(argv)
    from .runtime import profile

    prof = profile(args.profile)
    rows = load_rows(prof)
    if not rows:
        print(f"no results recorded for the {prof!r} profile yet (looked in {results_dir(prof)}); "
              f"run the notebooks first, e.g. `make learn`", file=sys.stderr)
        return 1
    text = f"{summary(rows)}\n\n{table(rows)}"
    print(text)
    if args.readme:
        paste_into(args.readme, prof, text)
        print(f"\npasted into {args.readme}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad option, an unreadable results file or README is one line and exit status 2."""
    return run(_main, argv, errors=(ValueError, OSError), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
