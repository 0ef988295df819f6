"""`brainscan stack` and `brainscan data`: the embedded local stack and the offline synthetic archive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON_OPTION, WORKDIR_OPTION, emit_json, fail


stack_app = typer.Typer(help="The embedded local stack (SeaweedFS S3 on 127.0.0.1, MLflow on sqlite).",
                        no_args_is_help=True)


@stack_app.command("up")
def stack_up(workdir: Path = WORKDIR_OPTION) -> None:
    """Start the stack (or reuse the running one); prints `export` lines for eval."""
    from brainscan.local import stack  # lazy: see the module docstring

    try:
        info = stack.up(workdir)
    except RuntimeError as err:
        fail(str(err))
    typer.echo(info.export_lines())


@stack_app.command("down")
def stack_down(workdir: Path = WORKDIR_OPTION) -> None:
    """Stop the stack and the work dir's local model server (deploy --local); leaves no process behind."""
    from brainscan.local import predictor, stack  # lazy: see the module docstring

    if predictor.stop(workdir):
        typer.echo("model server stopped", err=True)
    typer.echo("stopped" if stack.down(workdir) else "not running", err=True)


@stack_app.command("status")
def stack_status(workdir: Path = WORKDIR_OPTION) -> None:
    """Say whether the stack runs; exit code 0 when it does, 3 when it does not."""
    from brainscan.local import stack  # lazy: see the module docstring

    info = stack.status(workdir)
    if info is None:
        typer.echo("not running")
        raise typer.Exit(3)
    typer.echo(f"running: pid {info.pid}, S3 {info.s3_endpoint}, MLflow {info.tracking_uri}")


data_app = typer.Typer(help="Datasets: the offline synthetic archive.", no_args_is_help=True)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="Folder to write; the archive lands in OUT/Dataset/."),
    per_class: int = typer.Option(40, "--per-class", min=1, help="Images per class (7 classes)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also write a contact-sheet PNG here."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a deterministic synthetic CT/MRI archive in the Kaggle layout (the offline default)."""
    from brainscan.local import synth  # lazy: see the module docstring

    result = synth.generate(out, per_class=per_class, seed=seed)
    summary = result.summary()
    if preview is not None:
        summary["preview"] = str(synth.preview(preview, seed=seed))
    typer.echo(f"wrote {result.files} images ({result.per_class}) with {len(result.duplicates)} exact duplicates "
               f"to {Path(out) / 'Dataset'}", err=True)
    if as_json:
        emit_json(summary)
    else:
        typer.echo(result.out_dir)
