"""`brainscan serve` and `brainscan predict`: the KServe v2 model server and its client.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from brainscan.config import ServeSettings
from cli.common import emit_json, fail, with_settings


app = typer.Typer()  # its commands join the root command (cli/app.py)


@app.command("serve")
@with_settings(ServeSettings)
def serve_cmd(
    given: dict,
    model: str = typer.Option(..., "--model", help="Model bundle: models:/brain-tumor@champion, s3://... or a folder."),
    no_grpc: bool = typer.Option(False, "--no-grpc", help="Serve REST only."),
    threshold: Optional[float] = typer.Option(None, "--threshold", min=0.0, max=1.0,
                                              help="Decision threshold, overriding the model's calibrated ones."),
) -> None:
    """Run the KServe model server (v2 REST + gRPC) for the model `brain-tumor`."""
    from serving.server import ServeOptions, run  # lazy: loads kserve and TensorFlow

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = ServeOptions(model_uri=model, threshold=threshold, enable_grpc=not no_grpc, **given)
    try:
        run(options)
    except (ValueError, FileNotFoundError) as err:  # BundleError, missing threshold
        fail(str(err))


@app.command("predict")
def predict_cmd(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Image files (JPEG, PNG)."),
    url: str = typer.Option(f"http://127.0.0.1:{ServeSettings.http_port}", "--url", help="Model server base URL."),
    as_json: bool = typer.Option(False, "--json", help="Last output line: a JSON list of results."),
) -> None:
    """Send images to a model server; print class, tumor probability and decision per image."""
    from serving.client import ServerError, predict  # lazy: see the module docstring

    try:
        results = predict(url, images)
    except ServerError as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot reach {url}: {err}")
    for result in results:
        decision = "TUMOR" if result["tumor"] else "no tumor"
        typer.echo(f"{result['image']}\t{result['label']}\tP(tumor)={result['tumor_probability']:.4f}\t{decision}")
    if as_json:
        emit_json(results)
