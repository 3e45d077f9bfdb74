"""Run a test script in one process, or in several under torchrun (the distributed tests' launcher)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launch_ranks(script: Path, out: Path, processes: int) -> None:
    """``script OUT --scripted`` in ``processes`` processes (plain python for one), one thread each, the repository
    on the path; fails the test with the script's stderr when it does not exit 0."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(script).parent.parent)}
    done = subprocess.run([sys.executable, *launcher, str(script), str(out), "--scripted"], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
