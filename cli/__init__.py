"""The `brainscan` command line: one thin command per pipeline step and the groups around them."""

from cli.app import app

__all__ = ["app"]
