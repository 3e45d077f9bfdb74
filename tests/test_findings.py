""""What we found": every notebook closes with its own results rows rendered by rlnlp.results.findings,
and every committed figure a notebook links to exists."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from rlnlp import results, stats

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _add(res, diff, **kw):
    args = dict(system="LactChain", task="4×4 grid", metric="sampled success", method="SimPO", value=0.9,
                baseline="before SimPO", baseline_value=0.8, difference=diff, unit="start state")
    args.update(kw)
    return res.add(**args)


def _bullets(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("- ")]


def test_findings_renders_every_row_with_its_interval_and_verdict(monkeypatch):
    # fails if findings drops a row (e.g. rows[:-1]), swaps low and high, or loses the verdict
    monkeypatch.setenv("RLNLP_PROFILE", "cpu")
    res = results.Results("02_unit")
    rows = [_add(res, stats.Interval(0.198, 0.148, 0.248, 60)),
            _add(res, stats.Interval(-0.0333, -0.051, -0.0156, 60), method="oracle judge", claim="comparison"),
            _add(res, stats.Interval(-0.0234, -0.0745, 0.0276, 256), unit="evaluation episode (same seed)"),
            _add(res, stats.Interval(0.976, 0.917, 0.991, 30), claim="reference")]
    results.Results("other_notebook").add(system="x", task="t", metric="m", method="a", value=1, baseline="b",
                                          baseline_value=0, difference=stats.Interval(1, 0.5, 1.5, 3), unit="u")
    text = results.findings("02_unit")
    bullets = _bullets(text)
    assert len(bullets) == len(rows) == 4
    for line, row in zip(bullets, rows):
        assert f"{row['difference']:+.3g} [{row['low']:+.3g}, {row['high']:+.3g}]" in line, line
        assert f"{row['n']} " in line
    assert "**better**" in bullets[0] and "**worse**" in bullets[1] and "no difference shown" in bullets[2]
    assert "reference" in bullets[3] and "evaluation episodes (same seed)" in bullets[2]
    assert text.startswith("**cpu profile**") and "1 row" not in text
    assert text._repr_markdown_() == str(text)


def test_findings_shows_this_run_then_the_cpu_rows(monkeypatch):
    # a smoke run shows its own rows, then the committed cpu rows the notebook's text reads;
    # fails if either block is lost
    monkeypatch.setenv("RLNLP_PROFILE", "cpu")
    _add(results.Results("03_unit"), stats.Interval(0.1, 0.05, 0.2, 100), method="cpu method")
    monkeypatch.setenv("RLNLP_PROFILE", "smoke")
    _add(results.Results("03_unit"), stats.Interval(0.0, -0.2, 0.2, 4), method="smoke method")
    text = results.findings("03_unit")
    smoke, cpu = text.split("\n\n**cpu profile**")
    assert smoke.startswith("**smoke profile**") and "smoke method" in smoke and "cpu method" in cpu
    assert "no results recorded" in results.findings("never_ran", ["cpu"])


@pytest.mark.parametrize(
    "path", sorted((ROOT / "visualizations" / "results" / "cpu").glob("*.json")), ids=lambda p: p.stem
)
def test_committed_cpu_rows_render_one_bullet_each(path, monkeypatch):
    monkeypatch.setenv("RLNLP_VIS", str(ROOT / "visualizations"))
    rows = json.loads(path.read_text())
    bullets = _bullets(results.findings(path.stem, ["cpu"]))
    assert len(bullets) == len(rows)
    for line, row in zip(bullets, rows):
        assert row["method"] in line and f"{row['difference']:+.3g}" in line


def _sources(path: Path, kind: str) -> list[str]:
    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == kind]


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if "rlnlp.Results(" in p.read_text()], ids=lambda p: p.stem)
def test_each_system_notebook_ends_with_what_we_found(path):
    # fails if a notebook loses its "What we found" section or renders another notebook's rows
    code = _sources(path, "code")
    markdown = _sources(path, "markdown")
    assert any(re.match(r"#+ What we found", m) for m in markdown), "no 'What we found' heading"
    assert any(f'findings("{path.stem}")' in c for c in code), f'no cell calls findings("{path.stem}")'
    assert any(m.startswith("## Changes from the original") for m in markdown), "no 'Changes from the original' cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_linked_figure_exists(path):
    # fails if a notebook links a committed figure that is not in the repository (a renamed figure, a typo)
    links = [
        link for m in _sources(path, "markdown") for link in re.findall(r"\]\((\.\./visualizations/[^)\s]+\.png)\)", m)
    ]
    missing = [link for link in links if not (path.parent / link).resolve().is_file()]
    assert not missing, missing
