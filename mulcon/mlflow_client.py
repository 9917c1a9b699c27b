"""The one small module through which the library reaches MLflow: where the store is, whether it answers.

The tracking URI comes from `MLFLOW_TRACKING_URI`, default `sqlite:///mlflow.db` in the working
directory (embedded, no server). `tracking`, `serving` and `registry` connect through here.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from mulcon.errors import MulconError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(MulconError):
    """The tracking server cannot be reached, or refused a request."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail within `timeout` seconds, with a clear message, when an HTTP tracking server is down.

    MLflow's own client retries for minutes before it gives up; this asks `/health` once.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({reason}); start it, or unset "
                            f"MLFLOW_TRACKING_URI to log to {DEFAULT_TRACKING_URI}") from None


def connect():
    """The `mlflow` module and a client, both at `tracking_uri()`, once the server answers."""
    import mlflow

    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow, mlflow.MlflowClient(uri)
