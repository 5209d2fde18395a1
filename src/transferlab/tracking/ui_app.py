"""The MLflow server app `transferlab ui` runs (`mlflow server --app-name transferlab-ui`, an
`mlflow.app` entry point like MLflow's own `basic-auth`): MLflow's app, with the assistant panel
left closed on a browser's first visit so the runs table has the page.

MLflow 3.17 has no server setting, environment variable or URL parameter for this. Its frontend
opens the assistant panel once per browser on a localhost page, unless the localStorage flag
below is set; once set (or once the panel has been closed), the panel stays as the user left it.
The page sets the flag only if it is absent: the assistant stays one click away.
"""

from __future__ import annotations

from typing import Any

UI_APP = "transferlab-ui"  # its entry point's name (pyproject.toml)
AUTO_OPENED = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"  # useLocalStorage key + `_v<version>`
SET_ONCE = f"localStorage.getItem('{AUTO_OPENED}')===null&&localStorage.setItem('{AUTO_OPENED}','true')"
FIRST_VISIT = f"<script>try{{{SET_ONCE}}}catch(e){{}}</script>"


def mark_assistant_shown(response: Any) -> Any:
    """Put FIRST_VISIT at the top of MLflow's index page (before its bundle reads the flag)."""
    from flask import request

    if request.endpoint != "serve" or response.status_code != 200 or response.mimetype != "text/html":
        return response  # only the index page: never an artifact that happens to be HTML
    response.direct_passthrough = False  # a file response: read it to edit it
    page = response.get_data(as_text=True)
    if "<head>" in page and AUTO_OPENED not in page:
        response.set_data(page.replace("<head>", "<head>" + FIRST_VISIT, 1))
    return response


def create_app() -> Any:
    """MLflow's FastAPI app over its Flask app, with the index page marked (uvicorn --factory)."""
    from mlflow.server import app
    from mlflow.server.fastapi_app import create_fastapi_app

    app.after_request(mark_assistant_shown)
    return create_fastapi_app(app)
