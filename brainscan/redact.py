"""Credentials taken out of text before it is shown: the `user:password@` of every URI in it.

A tracking URI such as `https://alice:s3cret@mlflow.example.org` (MLflow sends the user part as
basic auth) or an S3 endpoint URL with keys in it must reach logs, error messages and command
output as `https://***@mlflow.example.org`. Every place that shows a URI, or an error text that
may hold one (MLflow's own messages repeat the URL they called), passes it through `redact`.
"""

from __future__ import annotations

import re

# scheme://userinfo@ : the userinfo runs to the last "@" before the host's end (a password may hold "@")
_USERINFO = re.compile(r"\b(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s?#\"'<>]+@")


def redact(text: object) -> str:
    """`text` with the user and password of each URI in it replaced by `***`."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))
