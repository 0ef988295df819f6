"""`brainscan`: one thin command per pipeline step, over the same functions the KFP components call.

The commands live in this folder by group (cli/steps.py, cli/pipeline.py, ...), their shared options
in cli/common.py; this module assembles them into the one `brainscan` command.
"""

from __future__ import annotations

import typer

from cli import local, model, pipeline, retrain, serve, steps

app = typer.Typer(help=__doc__.split("\n\n")[0], no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
app.add_typer(local.stack_app, name="stack")
app.add_typer(local.data_app, name="data")
app.add_typer(steps.app)
app.add_typer(model.model_app, name="model")
app.add_typer(serve.app)
app.add_typer(pipeline.pipeline_app, name="pipeline")
app.add_typer(pipeline.demo_app)
app.add_typer(retrain.retrain_app, name="retrain")

if __name__ == "__main__":
    app()
