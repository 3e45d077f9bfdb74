"""Paired comparisons (both modes): per-pool means, then rlnlp.stats; the unit is one held-out pool."""
from __future__ import annotations

import pandas as pd

from .. import stats as rstats


def per_pool(df: pd.DataFrame, value: str = "reward") -> pd.DataFrame:
    """Pools × selectors: the mean of ``value`` over each pool's rollouts."""
    return df.groupby(["pool", "selector"])[value].mean().unstack()


def paired(df: pd.DataFrame, a: str = "policy", b: str = "random", value: str = "reward") -> rstats.Interval:
    """Mean over pools of (a − b) with its paired 95% t-interval (``rlnlp.stats.paired_difference``);
    unit = one pool."""
    table = per_pool(df, value)
    return rstats.paired_difference(table[a].to_numpy(), table[b].to_numpy())


def gap_share(df: pd.DataFrame, a: str = "policy", low: str = "random", high: str = "document") -> rstats.Interval:
    """Share of the ``low`` → ``high`` gap that ``a`` closes, (ā − low̄) / (high̄ − low̄) (``rlnlp.stats.share_of_gap``),
    with a bootstrap 95% interval over pools (the three columns resampled together)."""
    table = per_pool(df)
    share = lambda x, lo, hi: rstats.share_of_gap(x.mean(), lo.mean(), hi.mean())
    return rstats.bootstrap(share, table[a].to_numpy(), table[low].to_numpy(), table[high].to_numpy(), n_resamples=2000)


def describe_difference(df: pd.DataFrame, a: str = "policy", b: str = "random", value: str = "reward",
                        unit: str = "nats/token") -> str:
    table = per_pool(df, value)
    rollouts = int(len(df[df["selector"] == a]) // max(1, len(table)))
    return (f"{a} {table[a].mean():+.4f} vs {b} {table[b].mean():+.4f} {unit}: difference {paired(df, a, b, value)} "
            f"(95% CI; {len(table)} held-out pools × {rollouts} rollout{'s' if rollouts != 1 else ''} each)")

