"""The Kubeflow Pipelines API as `submit` and `schedule` reach it, every failure one line.

`connect` first asks the API's health endpoint, with a timeout, one try and the bearer token, so an
endpoint that is down, refuses the connection or the token, fails TLS or does not answer gives one
line naming the host and what to do, within `timeout` seconds, before anything is sent (kfp.Client
would retry for minutes and print tracebacks); a host with credentials in it is shown redacted
(`mulcon.errors.redact`). Its later requests get the same timeout, and
`api_errors` turns what the server answers (an existing name, an unknown experiment) into one line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
import warnings
from typing import Iterator
from urllib.parse import urlsplit

import certifi
import kfp
import kfp_server_api
import urllib3

from mulcon.errors import redact
from pipeline.checks import PipelineError

HEALTHZ = "/apis/v2beta1/healthz"
DEFAULT_TIMEOUT = 5.0  # seconds; kfp.Client has no timeout of its own
HOST_HINT = "start it (or its port-forward: kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80) or " \
            "give its address with --host or KF_PIPELINES_ENDPOINT"


def check_host(host: str) -> str:
    """`host` without a trailing slash, once it is an http(s) URL with a host name."""
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PipelineError(f"--host {redact(host)!r}: not an http(s) URL; e.g. http://localhost:8080 (a port-forward) "
                            "or https://kubeflow.example/pipeline")
    return host.rstrip("/")


def _message(body: bytes | str | None) -> str:
    """The server's error message: `message` (or `error`) of a JSON body, else the text, on one line."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body or ""
    with contextlib.suppress(ValueError):
        answer = json.loads(text)
        if isinstance(answer, dict):
            text = str(answer.get("message") or answer.get("error") or text)
    return " ".join(text.split())[:300]


def http_problem(host: str, status: int, reason: str, body: bytes | str | None, token_env: str,
                 token: str | None) -> str:
    """The line for an HTTP error `status` answered by the API at `host`."""
    host = redact(host)
    answered = f"the Kubeflow Pipelines API at {host} answered {status} {reason}".rstrip()
    message = _message(body)
    detail = f": {message}" if message and message != reason else ""
    if status in (401, 403):
        which = f"${token_env} is not set" if not token else f"the token in ${token_env} was refused"
        return (f"{answered}{detail}; {which}: set {token_env} to a bearer token with access to the namespace "
                "(--token-env names another variable)")
    return f"{answered}{detail}"


def network_problem(host: str, reason: object, timeout: float) -> str:
    """The line for a connection to `host` that failed with `reason` (an exception or its text)."""
    host = redact(host)
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
        return (f"no answer from the Kubeflow Pipelines API at {host} within {timeout:g} s; check that it runs and "
                "that --host or KF_PIPELINES_ENDPOINT is its address (--timeout waits longer)")
    if isinstance(reason, ssl.SSLError) or "SSL" in str(reason):
        detail = redact(getattr(reason, "reason", None) or " ".join(str(reason).split()))
        return (f"TLS failure talking to {host} ({detail}); write http:// for a plain-HTTP endpoint (a port-forward), "
                "or check the server's certificate")
    if isinstance(reason, socket.gaierror) or "Name or service not known" in str(reason):
        return f"cannot reach the Kubeflow Pipelines API at {host}: unknown host name; check --host or KF_PIPELINES_ENDPOINT"
    if isinstance(reason, ConnectionRefusedError) or "refused" in str(reason):
        return f"cannot reach the Kubeflow Pipelines API at {host}: connection refused; {HOST_HINT}"
    return f"cannot reach the Kubeflow Pipelines API at {host}: {redact(' '.join(str(reason).split()))}; {HOST_HINT}"


def check_endpoint(host: str, token: str | None, token_env: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """One GET of the health endpoint: the API at `host` is up and takes the token.

    Raises:
        PipelineError: down, refusing, unauthorized (401/403), TLS failure, no answer within `timeout`
            seconds, or something that is not the API (a login page, say).
    """
    request = urllib.request.Request(host + HEALTHZ, headers={"Authorization": f"Bearer {token}"} if token else {})
    # As kfp.Client: no proxy from the environment, the certifi certificates.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(
        context=ssl.create_default_context(cafile=certifi.where())))
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise PipelineError(f"{redact(host)}{HEALTHZ} answered 404 Not Found: not a Kubeflow Pipelines v2 API; check "
                                "--host or KF_PIPELINES_ENDPOINT") from None
        raise PipelineError(http_problem(host, error.code, error.reason, error.read(), token_env, token)) from None
    except urllib.error.URLError as error:
        raise PipelineError(network_problem(host, error.reason, timeout)) from None
    except (OSError, http.client.HTTPException) as error:  # a timeout or a reset while reading the answer
        raise PipelineError(network_problem(host, error, timeout)) from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise PipelineError(f"{redact(host)}{HEALTHZ} did not answer as the Kubeflow Pipelines API (a login page?); check "
                            f"--host, and set {token_env} to a bearer token if the cluster asks for one")


def connect(host: str, namespace: str, token_env: str, token: str | None,
            timeout: float = DEFAULT_TIMEOUT) -> kfp.Client:
    """A kfp.Client of the API at `host` in `namespace`, checked first (`check_endpoint`); its
    requests time out after `timeout` seconds."""
    check_endpoint(host, token, token_env, timeout)
    with warnings.catch_warnings(), api_errors(host, token_env, token, timeout):
        warnings.simplefilter("ignore", FutureWarning)  # "only works with Kubeflow Pipeline v2.0.0-beta.2 and later"
        client = kfp.Client(host=host, existing_token=token, namespace=namespace)
    # Every service of the client shares one REST client; kfp passes no timeout, so give each request one.
    rest = client._run_api.api_client.rest_client
    send = rest.request

    def request(*args, _request_timeout=None, **kwargs):
        return send(*args, _request_timeout=_request_timeout or (timeout, timeout), **kwargs)

    rest.request = request
    return client


@contextlib.contextmanager
def api_errors(host: str, token_env: str, token: str | None, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Turn an error answer of the API, or a failed connection, inside the block into a PipelineError."""
    try:
        yield
    except kfp_server_api.ApiException as error:
        if not error.status:  # kfp's way of reporting a TLS failure
            raise PipelineError(network_problem(host, ssl.SSLError(error.reason), timeout)) from None
        raise PipelineError(http_problem(host, error.status, error.reason or "", error.body, token_env, token)) from None
    except urllib3.exceptions.MaxRetryError as error:
        raise PipelineError(network_problem(host, error.reason, timeout)) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise PipelineError(network_problem(host, error, timeout)) from None
