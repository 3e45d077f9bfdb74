"""Results rows and the scoreboard."""
import json

import pytest

from rlnlp import results, scoreboard, stats


def _row(res, diff, **kw):
    args = dict(system="alectors", task="grid", metric="greedy success", method="PPO", value=0.9,
                baseline="random", baseline_value=0.2, difference=diff, unit="start state")
    args.update(kw)
    return res.add(**args)


def test_rows_are_written_per_notebook_and_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("RLNLP_PROFILE", "cpu")
    res = results.Results("01_alectors")
    row = _row(res, stats.paired_difference([1, 1, 0.5, 1], [0, 0.2, 0, 0.1]))
    path = tmp_path / "vis" / "results" / "cpu" / "01_alectors.json"
    assert res.path == path and json.loads(path.read_text()) == [row]
    for key in ("system", "task", "metric", "method", "value", "baseline", "baseline_value", "difference", "low",
                "high", "n", "unit", "profile", "device", "wall_s", "date", "commit"):
        assert key in row
    assert row["profile"] == "cpu" and row["n"] == 4 and row["verdict"] == "yes"
    _row(res, stats.paired_difference([0, 1, 0, 1], [1, 0, 1, 0]), task="maze")
    assert [r["task"] for r in json.loads(path.read_text())] == ["grid", "maze"]
    # a new run of the notebook starts its file afresh
    _row(results.Results("01_alectors"), stats.Interval(0.1, 0.05, 0.2, 3))
    assert len(json.loads(path.read_text())) == 1


def test_bad_rows_are_refused(monkeypatch):
    monkeypatch.setenv("RLNLP_PROFILE", "cpu")
    res = results.Results("x")
    with pytest.raises(TypeError, match="Interval"):
        _row(res, (0.1, 0.2))
    with pytest.raises(ValueError, match="claim"):
        _row(res, stats.Interval(0.1, 0.05, 0.2, 3), claim="vibes")


def test_scoreboard_says_yes_only_when_the_interval_excludes_zero_in_the_good_direction(monkeypatch, capsys):
    monkeypatch.setenv("RLNLP_PROFILE", "cpu")
    res = results.Results("02_x")
    _row(res, stats.Interval(0.2, 0.1, 0.3, 60), task="up-good")
    _row(res, stats.Interval(0.2, -0.1, 0.5, 60), task="straddles")
    _row(res, stats.Interval(-0.2, -0.3, -0.1, 60), task="lower-is-better", higher_is_better=False)
    _row(res, stats.Interval(0.2, 0.1, 0.3, 60), task="up-bad", higher_is_better=False)
    _row(res, stats.Interval(0.2, 0.1, 0.3, 60), task="ref", claim="reference")
    assert scoreboard.main(["--profile", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| alectors")}
    assert "**yes**" in lines["up-good"] and "| no |" in lines["straddles"]
    assert "**yes**" in lines["lower-is-better"] and "| worse |" in lines["up-bad"] and "| — |" in lines["ref"]


def test_scoreboard_errors_are_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RLNLP_PROFILE", "full")
    assert scoreboard.main([]) == 1
    assert "no results recorded" in capsys.readouterr().err
    folder = tmp_path / "vis" / "results" / "full"
    folder.mkdir(parents=True)
    (folder / "bad.json").write_text("{not json")
    assert scoreboard.main(["--profile", "full"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json" in err


def test_scoreboard_pastes_into_the_readme_block(monkeypatch, tmp_path):
    monkeypatch.setenv("RLNLP_PROFILE", "cpu")
    _row(results.Results("01_a"), stats.Interval(0.2, 0.1, 0.3, 60))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- scoreboard:cpu -->\nold\n<!-- /scoreboard:cpu -->\nrest\n")
    assert scoreboard.main(["--profile", "cpu", "--readme", str(readme)]) == 0
    body = readme.read_text()
    assert "old" not in body and "| alectors | grid |" in body and body.endswith("rest\n")
    readme.write_text("no block")
    assert scoreboard.main(["--profile", "cpu", "--readme", str(readme)]) == 2


def test_scoreboard_pluralises_the_noun_before_a_parenthesis():
    from rlnlp.scoreboard import units

    assert (units("evaluation episode (same start and sampling seed)", 256)
            == "evaluation episodes (same start and sampling seed)")
    assert units("held-out route", 64) == "held-out routes"
    assert units("held-out route", 1) == "held-out route"
    assert units("start states", 60) == "start states"


def test_commit_is_dirty_only_for_changes_outside_the_notebooks_outputs(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "visualizations").mkdir()
    (tmp_path / "visualizations" / "fig.png").write_text("a")
    (tmp_path / "code.py").write_text("a")
    git("add", ".")
    git("commit", "-qm", "x")
    clean = results.git_commit(tmp_path)
    assert clean and "+dirty" not in clean and clean != "unknown"
    (tmp_path / "visualizations" / "fig.png").write_text("b")  # what a running notebook writes
    assert results.git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("b")
    assert results.git_commit(tmp_path) == clean + "+dirty"
