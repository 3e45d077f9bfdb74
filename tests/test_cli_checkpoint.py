"""The shared command-line error path (rlnlp.cli) and checkpoints (rlnlp.checkpoint)."""
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rlnlp import checkpoint
from rlnlp.cli import Parser, UsageError, nonneg_int, positive_float, positive_int, run


def _main(argv=None):
    parser = Parser(prog="python -m rlnlp.demo")
    parser.add_argument("--episodes", type=positive_int, default=1)
    parser.add_argument("--every", type=nonneg_int, default=0)
    parser.add_argument("--lr", type=positive_float, default=1.0)
    parser.add_argument("--fail", choices=("usage", "missing", "bug"))
    args = parser.parse_args(argv)
    if args.fail == "usage":
        raise UsageError("--fail usage:\n  contradicts itself")
    if args.fail == "missing":
        open("/nonexistent/task.yaml").close()
    if args.fail == "bug":
        raise KeyError("a bug")
    return {"episodes": args.episodes}  # a main may return results (a notebook uses them): status 0


@pytest.mark.parametrize("argv, needle", [
    (["--episodes", "0"], "python -m rlnlp.demo: error: argument --episodes: '0' is not an integer ≥ 1"),
    (["--every", "-1"], "'-1' is not an integer ≥ 0"),
    (["--lr", "nan"], "'nan' is not a number > 0"),
    (["--bogus"], "python -m rlnlp.demo: error: unrecognized arguments: --bogus"),
    (["--fail", "usage"], "python -m rlnlp.demo: --fail usage: contradicts itself"),
    (["--fail", "missing"], "python -m rlnlp.demo: /nonexistent/task.yaml: No such file or directory"),
])
def test_a_users_mistake_is_one_line_and_exit_2(capsys, argv, needle):
    # Mutations seen to fail: Parser.error calling argparse's own error (usage block: two lines); run() printing
    # the raw str(err) instead of describe(err) (the message keeps its newline; OSError shows "[Errno 2]"); positive_int
    # accepting 0.
    assert run(_main, argv, prog="python -m rlnlp.demo") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_run_returns_0_for_results_and_lets_bugs_raise(capsys):
    assert run(_main, []) == 0
    with pytest.raises(KeyError):  # mutation seen to fail: errors=(Exception,) swallows the bug
        run(_main, ["--fail", "bug"])
    assert run(_main, ["--help"]) == 0 and "--episodes" in capsys.readouterr().out


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3).tolist())


def test_rng_round_trip_reproduces_the_same_draws(tmp_path):
    # Mutations seen to fail: rng_state() leaving out numpy (np.random.rand differs); set_rng_state() not restoring
    # torch's generator.
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint.save(tmp_path / "rng.pt", rng=checkpoint.rng_state())
    first = _draws()
    assert _draws() != first  # the generators moved on: the check below is not comparing constants
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    assert _draws() == first


def test_load_names_the_file_when_missing_or_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt: no checkpoint there"):
        checkpoint.load(tmp_path / "nothing.pt")
    broken = tmp_path / "broken.pt"
    checkpoint.save(broken, step=1)
    broken.write_bytes(broken.read_bytes()[:50])  # truncated, as a plain write killed halfway leaves it
    with pytest.raises(checkpoint.CheckpointError, match="broken.pt: not a readable checkpoint") as info:
        checkpoint.load(broken)
    assert "\n" not in str(info.value)


_KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from rlnlp import checkpoint

    def half_then_killed(obj, f, *a, **k):  # the process dies with half the bytes written
        with open(f, "wb") as out:
            out.write(b"PK\\x03\\x04" + b"x" * 1000)
            out.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = half_then_killed
    checkpoint.save(sys.argv[1], step=2, weights=torch.zeros(3))
""")


def test_a_kill_mid_save_leaves_the_previous_checkpoint_readable(tmp_path):
    # Mutation seen to fail: save() writing straight to `path` (torch.save(objects, path)) — the old checkpoint is
    # truncated and load raises CheckpointError.
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, step=1, weights=torch.ones(3))
    proc = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(path)], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(Path(checkpoint.__file__).parents[1])})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-500:]
    state = checkpoint.load(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))


@pytest.mark.parametrize("command, argv, prog", [
    ("rlnlp.scoreboard", ["--profile", "nope"], "python -m rlnlp.scoreboard: error: argument --profile"),
    ("rlnlp.notebook", ["missing.ipynb"], "python -m rlnlp.notebook: no such notebook: missing.ipynb"),
    ("rlnlp.bench", ["nope"], "python -m rlnlp.bench: unknown suite 'nope'"),
    ("rlnlp.bench", ["sampler", "--repeat", "0"], "python -m rlnlp.bench sampler: error: argument --repeat"),
    ("rlnlp.envs.feedback_tasks", ["--n-train", "0"], "python -m rlnlp.envs.feedback_tasks: error: argument --n-train"),
])
def test_every_command_line_reports_a_mistake_in_one_line(capsys, command, argv, prog):
    # Mutation seen to fail: bench sampler's options parsed by a plain argparse.ArgumentParser (its usage block makes
    # the message two lines).
    import importlib

    assert importlib.import_module(command).main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(prog) and err.count("\n") == 1, err
