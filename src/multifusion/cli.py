"""The ``multifusion`` command line. Each command is thin: it parses arguments and calls
the library function that does the work."""

from __future__ import annotations

import typing
from dataclasses import replace
from pathlib import Path

import typer

from multifusion.core.errors import UserError, one_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="MultiFusion: identify nanomaterials in electron micrographs (screen, explain, describe classes).\n\n"
    "Example: multifusion predict --model models/hnf new_shots/ --out predictions.csv --report report.html",
)


def _print_version(value: bool) -> None:
    if value:
        from multifusion import __version__

        typer.echo(f"multifusion {__version__}")
        raise typer.Exit()


# What a command reports as one line and exit status 2: a user's mistake or a file problem
# (UserError: OutputPathError, ModelDirError, DiskFullError...; OSError: a path that cannot be
# read or written; a ValueError raised with a message that names the fix).
USER_ERRORS = (UserError, ValueError, OSError)


def _fail(exc: BaseException) -> typing.NoReturn:
    typer.echo(f"error: {one_line(exc)}", err=True)
    raise typer.Exit(2)


def _interrupted(command: str, since: int) -> typing.NoReturn:
    """Ctrl-C: one line saying what was kept (files are written whole or not at all), exit 130."""
    from multifusion.core.atomic import interrupted_line

    typer.echo(f"{command}: {interrupted_line(since)}", err=True)
    raise typer.Exit(130)


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """MultiFusion: identify nanomaterials in electron micrographs (screen, explain, describe classes).

    Example: multifusion predict --model models/hnf new_shots/ --out predictions.csv --report report.html
    """


@app.command()
def describe(
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the prompts that would be sent, how many are cached and a token estimate; send nothing."),
    show_prompts: bool = typer.Option(True, "--show-prompts/--no-prompts", help="With --dry-run: print each prompt's full text."),
    classes: str = typer.Option("data/prepared/classes.json", "--classes", help="Ordered class names (written by the prepare stage), or a data folder <root>/<Class>/*."),
    init: str | None = typer.Option(None, "--init", help="Write a curated-YAML skeleton for the classes (every template an empty list) to this path; nothing else runs."),
    from_descriptions: str | None = typer.Option(None, "--from-descriptions", help="With --init: fill the lists from a descriptions table (an LLM run's data/descriptions.parquet), for review."),
    prompts: str = typer.Option("prompts", "--prompts", help="Directory of templates, classes file and curated texts."),
    cache: str = typer.Option("data/llm/cache", "--cache", help="Parquet response cache."),
    out: str = typer.Option("data/descriptions.parquet", "--out", help="Descriptions table to write."),
    metrics: str = typer.Option("metrics/llm.json", "--metrics", help="Counts of requests, cache hits, failures, tokens."),
    params: str = typer.Option("params.yaml", "--params", help="Parameters file (section llm)."),
    set_: list[str] = typer.Option([], "--set", "-S", help="Override a parameter, e.g. -S llm.provider=openai."),
) -> None:
    """Write the class descriptions (the describe stage), preview them with --dry-run, or start a curated file with --init.

    Example: multifusion describe --init prompts/curated/mine.yaml --classes /data/micrographs
    """
    import os

    import yaml

    from multifusion.core.config import ConfigError, load_config
    from multifusion.llm import describe as run_describe
    from multifusion.llm import dry_run as plan_dry_run
    from multifusion.llm import format_dry_run, read_classes, write_outputs
    from multifusion.core.output_paths import JSON_RULE, TABLE_RULE, YAML_RULE, check_outputs
    from multifusion.llm.skeleton import folder_classes, write_skeleton

    try:
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in set_)}
        cfg = load_config(params, overrides)
        names = folder_classes(classes) if Path(classes).is_dir() else read_classes(classes)
        read = [p for p in (classes, from_descriptions, cfg.llm.classes_file) if p is not None and Path(p).is_file()]
        if init is not None:  # the output guard, before any work
            check_outputs({"--init": (init, YAML_RULE)}, read, folders=[classes] if Path(classes).is_dir() else [])
        elif not dry_run:
            check_outputs({"--out": (out, TABLE_RULE), "--metrics": (metrics, JSON_RULE)}, read,
                          folders=[p for p in (classes, cache) if Path(p).is_dir()])
        if init is not None:
            done = write_skeleton(init, names, cfg.llm, prompts, from_descriptions)
            typer.echo(f"{done.path}: {len(done.written)} class(es) x {len(cfg.llm.templates)} templates, {done.filled} texts filled in"
                       + (f"; left out, already in {prompts}/curated: {', '.join(done.already_listed)}" if done.already_listed else ""))
            return
        if dry_run:
            typer.echo(format_dry_run(plan_dry_run(cfg.llm, names, prompts, cache, os.environ), show_prompts))
            return
        result = run_describe(cfg.llm, names, prompts, cache, os.environ)
        write_outputs(result, out, metrics)
    except (*USER_ERRORS, RuntimeError, ConfigError) as exc:
        _fail(exc)
    typer.echo(f"{out}: {len(result.table)} descriptions; {result.metrics['requests_sent']} requests sent, {result.metrics['cache_hits']} cache hits")


@app.command()
def predict(
    paths: list[str] = typer.Argument(..., help="Micrograph files, folders (recursive) and glob patterns."),
    model: str = typer.Option("models/hnf", "--model", help="Directory of a trained model (config.json + model.safetensors)."),
    out: str = typer.Option("predictions.csv", "--out", help="CSV to write: one row per file."),
    top_k: int | None = typer.Option(None, "--top-k", help="Classes per row (default: params predict.top_k)."),
    threshold: float | None = typer.Option(None, "--threshold", help="Flag rows whose top-1 probability is below this (default: params predict.uncertain_threshold)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per forward pass (default: params predict.batch_size)."),
    contact_sheet: str | None = typer.Option(None, "--contact-sheet", help="PNG grid of the least certain images with their top predictions."),
    report: str | None = typer.Option(None, "--report", help="Self-contained HTML page: every input with thumbnail, calibrated top-k, uncertain flag, explanation overlay; sortable, filterable, offline."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    params: str | None = typer.Option(None, "--params", help="params.yaml for the defaults (default: ./params.yaml, else the model's own)."),
    target_accuracy: float | None = typer.Option(None, "--target-accuracy", help="Abstain (column `abstained`) where the model's val risk-coverage curve says a call would miss this accuracy, e.g. 0.99; rows stay in the CSV."),
    precision: str | None = typer.Option(None, "--precision", help="Forward pass: auto (bf16 where the device has it natively), fp32 (the same numbers on every machine) or bf16 (default: predict.precision)."),
) -> None:
    """Classify micrographs with a trained model; unreadable files are listed, never fatal.

    Example: multifusion predict --model models/hnf new_shots/ 'more/*.tif' --out predictions.csv --report report.html
    """
    from multifusion.core.atomic import mark
    from multifusion.inference.predict import predict_paths, predict_settings
    from multifusion.inference.views import ViewPolicy

    since = mark()
    try:
        settings = predict_settings(model, params)
        result = predict_paths(
            model, paths, out,
            top_k=settings.top_k if top_k is None else top_k,
            uncertain_threshold=settings.uncertain_threshold if threshold is None else threshold,
            batch_size=settings.batch_size if batch_size is None else batch_size,
            device=device,
            contact_sheet=contact_sheet,
            contact_sheet_size=settings.contact_sheet,
            report=report,
            target_accuracy=target_accuracy,
            views=ViewPolicy.of(settings if precision is None else replace(settings, precision=precision)),
            drift_p=settings.drift_p,
        )
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted("predict", since)
    uncertain = int((result.table["uncertain"] == True).sum())  # noqa: E712 (column mixes bools and "")
    unknown = int((result.table["unknown"] == True).sum())  # noqa: E712
    abstained = int((result.table["abstained"] == True).sum())  # noqa: E712
    typer.echo(f"{out}: {result.n_read} classified ({uncertain} uncertain, {unknown} unknown"
               + (f", {abstained} abstained at accuracy {target_accuracy:g}" if target_accuracy is not None else "")
               + f"), {result.n_failed} unreadable")
    if result.n_read == 0:
        typer.echo("error: no file could be read; see the error column of the CSV", err=True)
        raise typer.Exit(1)


@app.command()
def explain(
    paths: list[str] = typer.Argument(..., help="Micrograph files, folders (recursive) and glob patterns."),
    out: str = typer.Option(..., "--out", help="Folder for the overlay PNGs and explanations.csv."),
    model: str = typer.Option("models/hnf", "--model", help="Directory of a trained model (config.json + model.safetensors)."),
    size: int = typer.Option(512, "--size", help="Approximate side of each overlay in pixels (the model's view, upscaled)."),
    target: str | None = typer.Option(None, "--target", help="Explain this class instead of the predicted one."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Explanation overlays (where on the micrograph the call came from) as PNGs, for papers and slides.

    Example: multifusion explain --model models/hnf shots/a.tif shots/b.tif --out figures/
    """
    from multifusion.core.atomic import mark
    from multifusion.inference.overlays import explain_paths
    from multifusion.inference.predict import predict_settings
    from multifusion.inference.views import ViewPolicy

    since = mark()
    try:
        views = ViewPolicy.of(predict_settings(model, None))  # predict's views, so the call is predict's
        rows = explain_paths(model, paths, out, size=size, target=target, device=device, views=views)
    except USER_ERRORS as exc:
        _fail(exc)
    except KeyboardInterrupt:
        _interrupted("explain", since)
    written = sum(1 for r in rows if not r["error"])
    typer.echo(f"{out}: {written} overlays, {len(rows) - written} unreadable; see {Path(out) / 'explanations.csv'}")
    if written == 0:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
