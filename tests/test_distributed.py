"""Past one machine: ERL launched with torchrun in two CPU processes (gloo) against one process on the same global
batch (tests/erl_ranks.py, scripted samplers, real rewards / feedback / gate / memory / loss on the real policy).

Each rank holds 6 of the 12 rows, so the middle prompt's group is split between the processes; in the second step
one process retries 2 rows and the other 6 (uneven reward gathers and loss calls). Checked: both runs take two steps;
the memory is the same on both ranks and equal to one process's; every gated row keeps its own y1, reward and
feedback; one step's LoRA update equals the one-process update. Seen to fail, one mutation at a time:
  - rlnlp/erl/trainer.py, r1 = r1_all[: len(prompts)] (the gathered rewards not sliced to this process's rows): the
    second process's rows take the first's rewards — examples, memory and update differ;
  - _remember appends only this process's entries (no gather): the two ranks' memories differ;
  - the loss's token counts not summed over processes: the update is off (38% of its size);
  - rlnlp/distributed.py, the gradients not averaged by hand: each process steps alone (75% off);
  - before the loss padded every TRL call to the same rows on every process, the uneven second step crashed in
    gloo (TRL gathers per-row metrics).
"""
import json
from pathlib import Path

import pytest
import torch
from launch import launch_ranks

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("erl_ranks.py")
UPDATE_RTOL = 1e-4  # max |Δ₂ − Δ₁| / max |Δ₁| over the LoRA weights; measured 1.1e-6 (float32, summation order)


def _launch(out: Path, processes: int) -> list[dict]:
    launch_ranks(SCRIPT, out, processes)
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(processes)]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    one, two = _launch(root / "one", 1), _launch(root / "two", 2)
    return {"one": one, "two": two, "root": root}


def test_two_processes_take_two_steps_with_one_memory(launches):
    one, (rank0, rank1) = launches["one"][0], launches["two"]
    assert rank0["world"] == 2 and rank0["global_step"] == rank1["global_step"] == 2
    assert rank0["memory"] and rank0["memory"] == rank1["memory"]  # appended in the same order on both ranks
    assert rank0["memory"] == one["memory"] and len(one["memory"]) >= 2  # ... and one process's entries


def test_rows_keep_their_own_rewards_and_feedback(launches):
    one, (rank0, rank1) = launches["one"][0], launches["two"]
    assert len(one["examples"]) >= 4 and rank0["examples"] == rank1["examples"] == one["examples"]
    assert {e["r1"] for e in one["examples"]} == {0.0, 0.5}  # both kinds of failure were gated
    assert any(e["internalized"] for e in one["examples"]) and not all(e["stored"] for e in one["examples"])


@pytest.mark.parametrize("step", [1, 2])
def test_each_step_update_equals_one_process(launches, step):
    """Step 1: 3 and 3 retries; step 2: 2 and 6 retries, 4 of them internalized (from step 1's equal weights)."""
    one, two = (torch.load(launches["root"] / k / "weights.pt") for k in ("one", "two"))
    assert len(one) == len(two) == 3 and one[0].keys() == two[0].keys()
    assert all(torch.equal(one[0][n], two[0][n]) for n in one[0])  # the same start
    d1 = {n: one[step][n] - one[step - 1][n] for n in one[0]}
    d2 = {n: two[step][n] - two[step - 1][n] for n in one[0]}
    scale = max(d.abs().max().item() for d in d1.values())
    err = max((d1[n] - d2[n]).abs().max().item() for n in d1)
    assert scale > 1e-3, "the step did not move the LoRA weights"
    assert err / scale < UPDATE_RTOL, (err, scale)
