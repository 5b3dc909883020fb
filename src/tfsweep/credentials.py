"""Keep secrets out of the record: URLs as they may be shown, logged or stored.

A tracking URI (`http://user:token@host:5000`) or a storage URL (`postgresql://user:pw@host/db`,
`postgresql://host/db?password=pw`) may carry a password. Only `redact_url`'s output may reach MLflow
params, tags, artifacts, Hydra's `.hydra/` files, logs or the console.

Better still, `move_secrets` takes the password out of the config before Hydra records anything and
hands it to the libraries through the environment variables they already read: libpq (psycopg, so
Optuna's and MLflow's PostgreSQL stores) reads `PGPASSWORD`, MLflow's HTTP client reads
`MLFLOW_TRACKING_USERNAME` and `MLFLOW_TRACKING_PASSWORD`.
"""

from __future__ import annotations

import os
from typing import Any
from unittest.mock import patch

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from tfsweep.errors import ConfigError

SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "access_token", "sslpassword")
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def _parse(url: Any) -> URL | None:
    if not isinstance(url, str) or "://" not in url:
        return None  # not a URL, e.g. a journal file path
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def _secret_query_keys(parsed: URL) -> list[str]:
    return [key for key in parsed.query if key.lower() in SECRET_QUERY_KEYS]


def redact_url(url: str) -> str:
    """`url` with any password, in the authority or in the query, replaced by `***`."""
    parsed = _parse(url)
    if parsed is None:
        return str(url)
    if secret_keys := _secret_query_keys(parsed):
        parsed = parsed.update_query_dict({key: "***" for key in secret_keys})
    # SQLAlchemy percent-encodes query values; show our placeholder as it shows a hidden password.
    return parsed.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def move_secret(where: str, url: Any) -> tuple[str, dict[str, str]] | None:
    """Split a URL into the URL without its password and the environment variables that carry it instead.

    None when `url` carries no secret. `where` names the key (or variable) in the one-line ConfigError
    raised when no library used here would read the secret from the environment.
    """
    parsed = _parse(url)
    if parsed is None:
        return None
    query_secrets = _secret_query_keys(parsed)
    if parsed.password is None and not query_secrets:
        return None
    backend = parsed.get_backend_name()
    shown = f"{where}={redact_url(url)!r}"
    if backend == "postgresql" and set(query_secrets) <= {"password"}:
        password = parsed.password if parsed.password is not None else parsed.query["password"]
        clean = parsed._replace(password=None).difference_update_query(["password"])
        return clean.render_as_string(hide_password=False), {"PGPASSWORD": str(password)}
    if backend in ("http", "https") and not query_secrets and where in ("tracking.uri", TRACKING_URI_ENV):
        clean = parsed._replace(password=None)
        return clean.render_as_string(hide_password=False), {
            "MLFLOW_TRACKING_USERNAME": parsed.username or "", "MLFLOW_TRACKING_PASSWORD": parsed.password}
    raise ConfigError(f"{shown} carries a password that would be recorded: remove it from the URL and give it "
                      "through the client's own environment variable or file (MLFLOW_TRACKING_TOKEN, "
                      "~/.pgpass, ...)")


def _string_leaves(node: DictConfig | ListConfig, prefix: str = ""):
    """(parent node, key, dotted path, leaf node) of every string leaf, interpolations unresolved."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = node._get_node(key)
        path = f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix[:-1]}[{key}]"
        if isinstance(child, (DictConfig, ListConfig)):
            if not (child._is_none() or child._is_missing() or child._is_interpolation()):
                yield from _string_leaves(child, f"{path}.")
        elif isinstance(child._value(), str):
            yield node, key, path, child


def move_secrets(cfg: DictConfig) -> None:
    """Move every password in `cfg`'s URLs (and in MLFLOW_TRACKING_URI) to the environment, in place.

    Each URL is rewritten without its secret wherever it appears, including the override strings
    Hydra records under `hydra.overrides`, so that `.hydra/` and everything after see the clean URL.
    Raise ConfigError, naming the key, for a secret that cannot be moved; the config and the
    environment are then left as they were.
    """
    url_texts: dict[str, str] = {}  # URL as written -> the same URL without its secret
    environment: dict[str, tuple[str, str]] = {}  # variable -> (value, the key it came from)

    def take(where: str, url: Any) -> str | None:
        moved = move_secret(where, url)
        if moved is None:
            return None
        clean, variables = moved
        for name, value in variables.items():
            earlier = environment.setdefault(name, (value, where))
            if earlier[0] != value:
                raise ConfigError(f"{earlier[1]} and {where} carry different values for {name}: remove the "
                                  "passwords from the URLs and give them through ~/.pgpass or the environment")
        url_texts[url] = clean
        return clean

    env_uri = os.environ.get(TRACKING_URI_ENV)
    env_clean = take(TRACKING_URI_ENV, env_uri)
    leaves = list(_string_leaves(cfg))
    new_values: dict[int, str] = {}  # leaf index -> value that replaces an interpolation
    with patch.dict(os.environ, {TRACKING_URI_ENV: env_clean} if env_clean else {}):
        for index, (_, _, path, node) in enumerate(leaves):
            if path.startswith("hydra."):
                continue  # Hydra's records of the command line, rewritten below
            if not node._is_interpolation():
                take(path, node._value())
                continue
            try:  # a value from the environment or another key, e.g. `${oc.env:DATABASE_URL}`
                resolved = OmegaConf.select(cfg, path, throw_on_resolution_failure=True)
            except Exception:  # noqa: BLE001 - not resolvable before the job starts, so not a URL in use
                continue
            if (clean := take(path, resolved)) is not None:
                new_values[index] = clean

    passwords = [value for name, (value, _) in environment.items() if name != "MLFLOW_TRACKING_USERNAME"]
    for index, (_, _, path, node) in enumerate(leaves):
        value = new_values.get(index, node._value())
        for secret_url, clean in url_texts.items():
            value = value.replace(secret_url, clean)
        # A URL written differently in an override than in the value (quoted, escaped) would survive the
        # replacement: refuse rather than record it.
        if "://" in value and any(password in value for password in passwords):
            raise ConfigError(f"{path} repeats a password in a form that cannot be cleaned: write the URL "
                              "without it and give the password through the environment or ~/.pgpass")
        new_values[index] = value

    if env_clean is not None:
        os.environ[TRACKING_URI_ENV] = env_clean
    os.environ.update({name: value for name, (value, _) in environment.items()})
    for index, (parent, key, _, node) in enumerate(leaves):
        if new_values[index] != node._value():
            with read_write(parent), open_dict(parent):
                parent[key] = new_values[index]
