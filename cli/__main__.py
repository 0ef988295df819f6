"""`python -m cli`: the same as the `brainscan` command."""

from cli import app

app()
