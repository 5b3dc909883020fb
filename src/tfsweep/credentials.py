"""Keep secrets out of the record: URLs as they may be shown, logged or stored.

A tracking URI (`http://user:token@host:5000`) or a storage URL (`postgresql://user:pw@host/db`,
`postgresql://host/db?password=pw`) may carry a password. Only `redact_url`'s output may reach MLflow
params, tags, artifacts, Hydra's `.hydra/` files, logs or the console.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "token", "access_token", "sslpassword")


def redact_url(url: str) -> str:
    """`url` with any password, in the authority or in the query, replaced by `***`."""
    if "://" not in str(url):
        return str(url)  # a file path, e.g. a journal file
    try:
        parsed = make_url(str(url))
    except ArgumentError:
        return str(url)
    secret_keys = [key for key in parsed.query if key.lower() in SECRET_QUERY_KEYS]
    if secret_keys:
        parsed = parsed.update_query_dict({key: "***" for key in secret_keys})
    return parsed.render_as_string(hide_password=True)
