"""Links into the MLflow UI that open where a user should land: a study's runs table with the
key columns, not MLflow 3's GenAI overview. No heavy imports: `transferlab ui` prints these."""

from __future__ import annotations

import json
from typing import Any

from transferlab import tags

UI_BASE = "http://127.0.0.1:5000"  # `transferlab ui` serves a local store here
# The runs table a study opens on (MLflow's shared-view experiment tag, read by its 3.x frontend):
# the columns that answer "which strategy, how accurate, at what cost" instead of Source/Models/Dataset.
VIEW_KEY = "transferlab"
KEY_COLUMNS = (
    "params.`finetune.strategy`",
    "params.`finetune.freeze_depth`",
    "metrics.`data/train_size`",
    "metrics.`test/acc_pct`",
    "metrics.`compute/train_gflops`",
    "metrics.`compute/fit_seconds`",
)


# The job runs only, best first: a search filter or a sort other than by date makes MLflow list
# runs flat (its runs table nests children only then), so the first view shows results instead
# of one collapsed parent row with empty cells. The parent's results are on its own page.
JOB_RUNS = {
    "searchFilter": tags.role_query(tags.ROLE_JOB),
    "orderByKey": "metrics.`test/acc_pct`",
    "orderByAsc": False,
}
# Wide enough to read the run names and the headers (MLflow applies widths to the columns it orders).
RUN_NAME_COLUMN = "attributes.`Run Name`"
COLUMN_WIDTHS = {RUN_NAME_COLUMN: 280} | dict(zip(KEY_COLUMNS, (130, 150, 120, 120, 170, 160)))

CHART_KEY = "transferlab-chart"
# Accuracy against training compute as a scatter, one point per target x strategy (mean over seeds),
# coloured by group: the report's plot, inside the UI.
CONDITION = ("data.name", "data.samples_per_class", "finetune.strategy")
SCATTER = {
    "uuid": "transferlab-scatter",
    "type": "SCATTER",
    "runsCountToCompare": 200,
    "metricSectionId": "transferlab-section",
    "deleted": False,
    "isGenerated": False,
    "displayName": "test accuracy (%) vs training GFLOPs",
    "xaxis": {"key": "compute/train_gflops", "type": "METRIC"},
    "yaxis": {"key": "test/acc_pct", "type": "METRIC"},
}
CHART_VIEW = {
    **JOB_RUNS,  # no parent run among the groups: it has no condition params ("Unassigned")
    "selectedColumns": list(KEY_COLUMNS),
    "runsHiddenMode": "SHOW_ALL",  # MLflow's default charts only the first 10 runs (or groups)
    "groupBy": {
        "aggregateFunction": "average",
        "groupByKeys": [{"mode": "param", "groupByData": key} for key in CONDITION],
    },
    "useGroupedValuesInCharts": True,
    "compareRunSections": [
        {
            "uuid": "transferlab-section",
            "name": "Accuracy vs compute",
            "display": True,
            "isReordered": False,
            "columns": 1,  # one chart across the section (MLflow's 3 per row left it ~170 px wide)
            "cardHeight": 520,
        }
    ],
    "compareRunCharts": [SCATTER],
}


def set_default_view(client: Any, exp_id: str) -> None:
    """Make the experiment open on its runs table (not GenAI) with the key columns, via `ui_url`."""
    view = {
        **JOB_RUNS,
        "selectedColumns": list(KEY_COLUMNS),
        "columnOrder": list(COLUMN_WIDTHS),
        "columnWidths": COLUMN_WIDTHS,
        "runsHiddenMode": "SHOW_ALL",
    }
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(view))
    client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{CHART_KEY}", json.dumps(CHART_VIEW))
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")


def ui_url(experiment_id: str, run_id: str | None = None, uri: str = "", base: str = UI_BASE) -> str:
    """MLflow UI link: the experiment's runs table (MLflow 3 otherwise opens a GenAI overview) with
    the key columns (VIEW_KEY), or one run."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else base
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def chart_url(experiment_id: str, base: str = UI_BASE) -> str:
    """The study's accuracy-vs-GFLOPs scatter, grouped (and coloured) by target x strategy."""
    view = f"workflowType=machine_learning&viewStateShareKey={CHART_KEY}&compareRunsMode=CHART"
    return f"{base}/#/experiments/{experiment_id}/runs?{view}"
