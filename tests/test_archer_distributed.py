"""Past one machine: ArCHer under accelerate, launched with torchrun in two CPU processes (gloo), against one process
on the same global batch (tests/archer_ranks.py: 8 environments, 4 per process; 2 iterations; real environments,
buffer, critic and actor on the real policy, each utterance sampled alone so both launches see the same ones).

Checked: the buffers are the same on both ranks and equal to one process's, at every iteration; the episodes and the
evaluation (5 episodes, split 3 and 2) are gathered in order; each iteration's critic update and the actor update
equal the one-process update and are the same on both ranks; the advantages are normalised over both ranks' rows;
process 0 alone writes the checkpoint. Seen to fail, one mutation at a time:
  - rlnlp/archer/training.py, buffer.add(col.step(...)) without ranks.gather: each rank's buffer holds its own
    transitions only (buffers, updates and checkpoint differ);
  - the advantages normalised over each rank's own rows (not gathered): the advantages and the actor update differ;
  - the critic built without sync (gradients not averaged): each rank steps on its own half-batch (both critic
    updates differ between ranks and from one process, and so does everything after);
  - actor_step without sync: the actor update differs (and the evaluation it plays);
  - rlnlp/archer/acting.py, each process's resets seeded from the shared counter without the lower ranks' resets:
    the second iteration's buffer and the episodes differ.
"""
from pathlib import Path

import pytest
import torch
from launch import launch_ranks

from rlnlp import checkpoint

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("archer_ranks.py")
UPDATE_RTOL = 1e-4  # max |Δ₂ − Δ₁| / max |Δ₁| over the weights (float32, summation order): measured critic 8e-8
#                      (iteration 0) and 2.0e-7 (iteration 1), actor 3.1e-6
ADVANTAGE_ATOL = 1e-3  # |A₂ − A₁| of advantages of size ~20 (normalised, not centred): measured 7.6e-6


def _launch(out: Path, processes: int) -> list[dict]:
    launch_ranks(SCRIPT, out, processes)
    return [torch.load(out / f"rank{k}.pt", weights_only=False) for k in range(processes)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("archer_ranks")
    (one,), two = _launch(root / "one", 1), _launch(root / "two", 2)
    return {"one": one, "two": two, "root": root}


def _update_error(a, b) -> tuple[float, float]:
    """(max |Δ_b − Δ_a| / max |Δ_a|, max |Δ_a|) of two (before, after) weight snapshots."""
    da = {n: a[1][n] - a[0][n] for n in a[0]}
    db = {n: b[1][n] - b[0][n] for n in a[0]}
    scale = max(d.abs().max().item() for d in da.values())
    return max((da[n] - db[n]).abs().max().item() for n in da) / scale, scale


def test_buffers_are_the_same_on_both_ranks_and_in_one_process(launches):
    one, (rank0, rank1) = launches["one"], launches["two"]
    assert rank0["world"] == rank1["world"] == 2 and one["world"] == 1
    assert [len(b) for b in one["buffers"]] == [8, 16]  # every environment's transition, at each iteration
    assert rank0["buffers"] == rank1["buffers"] == one["buffers"]  # in the same order
    assert rank0["env_steps"] == rank1["env_steps"] == one["env_steps"] == 16


def test_episodes_and_evaluation_are_gathered_in_order(launches):
    one, (rank0, rank1) = launches["one"], launches["two"]
    assert len(one["episodes"]) == 16 and rank0["episodes"] == rank1["episodes"] == one["episodes"]
    assert one["eval"]["starts"] == list(range(10_000, 10_005))
    assert rank0["eval"] == rank1["eval"] == one["eval"]


@pytest.mark.parametrize("kind,index", [("critic", 0), ("critic", 1), ("actor", 0)])
def test_update_equals_one_process(launches, kind, index):
    """Critic: iteration 0 (critic only) and 1; actor: iteration 1's step (after the critic-only warm-up)."""
    one, (rank0, rank1) = launches["one"], launches["two"]
    assert len(one[kind]) == len(rank0[kind]) == len(rank1[kind])
    for n in rank0[kind][index][1]:  # the ranks step from the same weights to the same weights
        assert torch.equal(rank0[kind][index][0][n], rank1[kind][index][0][n])
        assert torch.equal(rank0[kind][index][1][n], rank1[kind][index][1][n])
    err, scale = _update_error(one[kind][index], rank0[kind][index])
    assert scale > 1e-4, "the update did not move the weights"
    assert err < UPDATE_RTOL, (err, scale)


def test_advantages_are_normalised_over_both_ranks(launches):
    one, (rank0, rank1) = launches["one"], launches["two"]
    (a1,), (a20,), (a21,) = one["advantages"], rank0["advantages"], rank1["advantages"]
    assert len(a1) == 4 and len(a20) == len(a21) == 2  # each rank's block of the 4 fresh states
    assert a1.std() > 1e-3
    assert (torch.cat([a20, a21]) - a1).abs().max() < ADVANTAGE_ATOL


def test_process_zero_alone_writes_the_checkpoint(launches):
    run = launches["root"] / "two" / "runs" / "ranks"
    assert (run / "checkpoints" / "latest" / "state.pt").exists() and (run / "run.json").exists()
    assert (run / "rank1" / "metrics.csv").exists() and not (run / "rank1" / "checkpoints").exists()
    state = checkpoint.load(run / "checkpoints" / "latest" / "state.pt")
    assert len(state["progress"]["buffer"]["items"]) == 16 and state["progress"]["collector"] is None
