"""The ``multifusion`` command line. Each command is thin: it parses arguments and calls
the library function that does the work."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MultiFusion: nanomaterial identification in electron micrographs.")


@app.callback()
def main() -> None:
    """MultiFusion command line."""


if __name__ == "__main__":
    app()
