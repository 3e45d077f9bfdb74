"""``python -m rlnlp.attention_guided``: see rlnlp.attention_guided.cli."""
from ..cli import run
from .cli import ERRORS, PROG, main

if __name__ == "__main__":
    raise SystemExit(run(main, errors=ERRORS, prog=PROG))
