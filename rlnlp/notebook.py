"""Run a notebook headless (``make demo``) or strip outputs (``make strip``).

    python -m rlnlp.notebook IN.ipynb [OUT.ipynb]     execute, save the executed copy to OUT
    python -m rlnlp.notebook --strip A.ipynb ...      remove outputs and execution counts in place
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli import UsageError, run


def has_outputs(nb) -> bool:
    return any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")


def strip(path: str | Path) -> bool:
    """Remove outputs and execution counts; return True if the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    if not has_outputs(nb):
        return False
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)
    return True


def execute(src: str | Path, dst: str | Path | None = None, timeout: int = 1800) -> float:
    """Execute ``src`` in its own folder; write the executed notebook to ``dst``; return seconds taken."""
    import nbformat
    from nbclient import NotebookClient

    src = Path(src)
    nb = nbformat.read(src, as_version=4)
    start = time.time()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(src.parent)}})
    client.execute()
    took = time.time() - start
    if dst:
        nbformat.write(nb, dst)
    print(f"executed {src} in {took:.0f} s" + (f" -> {dst}" if dst else ""))
    return took


PROG = "python -m rlnlp.notebook"
USAGE = f"usage: {PROG} IN.ipynb [OUT.ipynb] | --strip A.ipynb ..."


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        if not argv:
            raise UsageError(f"no notebook given; {USAGE}")
        return 0
    bad = [a for i, a in enumerate(argv) if a.startswith("-") and not (i == 0 and a == "--strip")]
    if bad or (argv[0] != "--strip" and len(argv) > 2):
        raise UsageError(f"{USAGE} (got {' '.join(bad or argv[2:])})")
    paths = argv[1:] if argv[0] == "--strip" else argv[:1]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UsageError(f"no such notebook: {', '.join(missing)}")
    if argv[0] == "--strip":
        for p in argv[1:]:
            if strip(p):
                print(f"stripped {p}")
        return 0
    try:
        execute(argv[0], argv[1] if len(argv) > 1 else None)
    except Exception as err:  # a failing cell: say which, without the kernel's full traceback
        first = str(err).strip().splitlines()
        print(f"{PROG}: {argv[0]} failed: {err.__class__.__name__}: {first[-1] if first else ''}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: a bad argument or a missing notebook is one line and exit status 2; a failing cell, 1."""
    return run(_main, sys.argv[1:] if argv is None else argv, errors=(UsageError,), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
