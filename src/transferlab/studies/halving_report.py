"""The report's section on a halving sweep: how many configurations were compared, and which
were pruned at which rung and why. The report's statistics count FINISHED runs only (load_runs),
so a pruned configuration never enters a paired comparison; this section keeps it visible.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from transferlab import tags as tag_names
from transferlab.tags import target_label, target_name


def load_pruned(client: Any, experiment: str) -> pd.DataFrame:
    """One row per pruned job run of a study: rung, target, configuration, seed, reason."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    query = tag_names.role_query(tag_names.ROLE_JOB) + f" and tags.`{tag_names.PRUNED}` != ''"
    rows, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], query, max_results=1000, page_token=token)
        for run in page:
            reason, params = run.data.tags[tag_names.PRUNED], run.data.params
            named = target_name({f"params.{k}": v for k, v in params.items()})
            rung = re.match(r"rung (\d+)", reason)
            rows.append(
                {
                    "rung": int(rung.group(1)) if rung else 0,
                    "target": target_label(named, run.data.metrics.get("data/train_size")),
                    "configuration": re.sub(r"-s\d+$", "", run.info.run_name or ""),
                    "condition_hash": run.data.tags.get(tag_names.CONDITION_HASH, run.info.run_id),
                    "seed": params.get("seed"),
                    "reason": reason,
                    "train_flops": run.data.metrics.get("compute/train_flops", float("nan")),
                }
            )
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows)


def halving_section(pruned: pd.DataFrame, finished: pd.DataFrame) -> str:
    """Markdown: configurations compared, those that reached the full budget, the pruned by rung."""
    if pruned.empty:
        return ""
    kept = finished["condition_hash"].nunique() if "condition_hash" in finished else 0
    configs = pruned.groupby("condition_hash", sort=False).agg(
        rung=("rung", "first"),
        target=("target", "first"),
        configuration=("configuration", "first"),
        seeds=("seed", lambda s: " ".join(sorted(map(str, s), key=lambda v: (len(v), v)))),
        reason=("reason", "first"),
    )
    lines = [
        "",
        "## Successive halving",
        "",
        f"- {kept + len(configs)} configurations compared: {kept} trained to the full budget (the tables above), "
        f"{len(configs)} pruned at a rung (below; their runs are KILLED with the tag `{tag_names.PRUNED}`, "
        "partial curves kept, never counted in the statistics)",
        "",
        "| rung | target | configuration | seeds | why |",
        "|---|---|---|---|---|",
    ]
    for r in configs.sort_values(["rung", "target", "configuration"]).itertuples():
        lines.append(f"| {r.rung} | {r.target} | {r.configuration} | {r.seeds} | {r.reason.split(': ', 1)[-1]} |")
    return "\n".join(lines) + "\n"
