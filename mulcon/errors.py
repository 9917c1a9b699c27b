"""Errors the library raises for bad input (the CLI turns them into a message and exit code 2), and
`redact`, which keeps the secrets of URIs out of those messages and of every log line."""

import os
import re


class MulconError(Exception):
    """Base class: the message names the file, line or key at fault."""


class ConfigError(MulconError):
    """An unknown key, a wrong type or an invalid value in params.yaml or an override."""


class DataError(MulconError):
    """A dataset that is missing, malformed or empty."""


class CheckpointError(MulconError):
    """A checkpoint that cannot be resumed (missing, corrupt or made for another model)."""


class TrainingError(MulconError):
    """Training cannot go on (a NaN or infinite loss)."""


# scheme://user:password@host or scheme://token@host: the userinfo of a URL (a tracking URI, a DVC
# remote, a git repository) that may carry a secret.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^\s/@:]*)(?::(?P<secret>[^\s/@]*))?@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|access_token|secret|sig|signature|api_key|apikey)=)[^&\s#]+")
_SECRET_ENVIRONMENT = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def redact(text: object) -> str:
    """`text` with every password or token in it replaced by `***`: the password of each URL's
    userinfo (`postgresql://user:***@host/db`), a userinfo without a password (`https://***@host`,
    the form of a token), secret query parameters (`?token=***`) and the values of
    MLFLOW_TRACKING_PASSWORD and MLFLOW_TRACKING_TOKEN wherever they appear.

    The one function for this: every log line, error, MLflow tag or param that shows a URI goes
    through it.
    """
    def userinfo(match: re.Match) -> str:
        if match.group("secret") is not None:
            return f"{match.group('scheme')}{match.group('user')}:***@"
        return f"{match.group('scheme')}***@"

    text = _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(userinfo, str(text)))
    for name in _SECRET_ENVIRONMENT:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:  # a value this short would mask ordinary words
            text = text.replace(secret, "***")
    return text
