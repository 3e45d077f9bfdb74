"""Run a notebook headless (``make demo``) or strip outputs (``make strip``).

    python -m rlnlp.notebook IN.ipynb [OUT.ipynb]     execute, save the executed copy to OUT
    python -m rlnlp.notebook --strip A.ipynb ...      remove outputs and execution counts in place
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


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
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(src.parent)}}).execute()
    took = time.time() - start
    if dst:
        nbformat.write(nb, dst)
    print(f"executed {src} in {took:.0f} s" + (f" -> {dst}" if dst else ""))
    return took


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    bad = [a for i, a in enumerate(argv) if a.startswith("-") and not (i == 0 and a == "--strip")]
    if bad or (argv[0] != "--strip" and len(argv) > 2):
        print(f"error: usage: python -m rlnlp.notebook IN.ipynb [OUT.ipynb] | --strip A.ipynb ... "
              f"(got {' '.join(bad or argv[2:])})", file=sys.stderr)
        return 2
    paths = argv[1:] if argv[0] == "--strip" else argv[:1]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        print(f"error: no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    if argv[0] == "--strip":
        for p in argv[1:]:
            if strip(p):
                print(f"stripped {p}")
        return 0
    try:
        execute(argv[0], argv[1] if len(argv) > 1 else None)
    except Exception as err:  # a failing cell: say which, without the kernel's full traceback
        first = str(err).strip().splitlines()
        print(f"error: {argv[0]} failed: {err.__class__.__name__}: {first[-1] if first else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
