"""The one rule for code written against a library's internals: it runs only on the version it was written for."""

from __future__ import annotations

from importlib import metadata


def require_version(distribution: str, written_for: str, module: str, what: str) -> None:
    """ImportError unless `distribution` is installed at exactly `written_for`.

    module: the adapting module (named in the error, so an upgrade knows what to re-read); what: the
    part of the library whose behaviour it adapts to.
    """
    installed = metadata.version(distribution)
    if installed != written_for:
        path = module.replace(".", "/") + ".py"
        raise ImportError(
            f"{module} was written for {distribution} {written_for}, found {installed}: re-check each adaptation "
            f"listed in {path} against the new {what} (drop those it now covers), then update the version there")
