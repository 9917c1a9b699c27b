"""The one small module through which the library reaches MLflow: where the store is, whether it answers.

The tracking URI comes from `MLFLOW_TRACKING_URI`, default `sqlite:///mlflow.db` in the working
directory (embedded, no server). `tracking`, `serving` and `registry` connect through here.

A URI may carry credentials (`https://user:token@host`, `postgresql://user:password@host/db`):
the server check sends them as MLflow does (basic auth from the userinfo or from
MLFLOW_TRACKING_USERNAME/PASSWORD, a bearer MLFLOW_TRACKING_TOKEN), and every message and log line
shows the URI through `mulcon.errors.redact`. MLflow's HTTP retries are bounded (`HTTP_LIMITS`,
unless the user set them): a server that goes away mid-run fails a call within seconds, not minutes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import urllib.error
import urllib.request
from typing import Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

from mulcon.errors import MulconError, redact

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's defaults (7 retries, backoff factor 2, 120 s a request) wait about 8 minutes for a server
# that is down; these give up after about 10 s (refused) or 3 x 15 s (no answer).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class TrackingError(MulconError):
    """The tracking server cannot be reached, or refused a request."""


class RedactingFilter(logging.Filter):
    """Rewrites a record's message through `redact` (MLflow logs run URLs with the tracking URI in them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact_logs(*loggers: logging.Logger) -> None:
    """Put a `RedactingFilter` on every handler of the root logger, of `mlflow` and of `loggers`."""
    for logger in (logging.getLogger(), logging.getLogger("mlflow"), *loggers):
        for handler in logger.handlers:
            if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
                handler.addFilter(RedactingFilter())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def bound_http_retries() -> None:
    """Set MLflow's HTTP retry and timeout variables to `HTTP_LIMITS`, each unless already set."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)


def _request(uri: str) -> urllib.request.Request:
    """A GET of `uri`'s /health with the credentials MLflow would send, the userinfo taken out of the URL."""
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 address
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    username = unquote(parts.username) if parts.username else os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = unquote(parts.password or "") if parts.username else os.environ.get("MLFLOW_TRACKING_PASSWORD")
    headers = {}
    if username:
        token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    return urllib.request.Request(url, headers=headers)


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail within `timeout` seconds, with a clear message, when an HTTP tracking server is down or
    refuses the credentials.

    MLflow's own client retries before it gives up; this asks `/health` once.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(_request(uri), timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise TrackingError(f"MLflow tracking server {redact(uri)} refused the credentials ({error.code} "
                                f"{error.reason}); check the URI's user and password or MLFLOW_TRACKING_USERNAME/"
                                "PASSWORD/TOKEN") from None
        raise TrackingError(f"MLflow tracking server {redact(uri)} answered {error.code} {error.reason} "
                            "to /health") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({redact(reason)}); start it, or "
                            f"unset MLFLOW_TRACKING_URI to log to {DEFAULT_TRACKING_URI}") from None


def connect():
    """The `mlflow` module and a client, both at `tracking_uri()`, once the server answers."""
    bound_http_retries()
    import mlflow

    redact_logs()
    uri = tracking_uri()
    if redact(uri) != uri:  # MLflow prints each run's URL, credentials included, on stdout
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow, mlflow.MlflowClient(uri)


@contextlib.contextmanager
def tracking_errors(action: str, resume_hint: bool = False) -> Iterator[None]:
    """Turn a tracking call that fails inside the block (the server went away and MLflow's bounded
    retries gave up, or it refused a request) into one TrackingError line naming the server,
    without its credentials. `resume_hint`: the line says the checkpoint is intact and how to go on."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        yield
    except (MlflowException, RequestException) as error:
        reason = " ".join(redact(error).split())[:300]
        hint = ("; the checkpoint is intact: rerun with --resume once the server answers (the epochs it missed "
                "are logged then)") if resume_hint else ""
        raise TrackingError(f"MLflow tracking server {redact(tracking_uri())} failed during {action} "
                            f"({reason}){hint}") from None
