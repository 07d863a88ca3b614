"""The `ptqlab` command line: a thin typer layer over the public API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ptqlab.errors import PtqlabError
from ptqlab.progress import console

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Quantize Hugging Face causal LMs and prove what it cost.")


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}", highlight=False)
    raise typer.Exit(2)


@app.command()
def quantize(
    model: Annotated[Optional[str], typer.Argument(help="Hub id or local folder; omitted: the embedded SmolLM2-135M-Instruct.")] = None,
    recipe: Annotated[str, typer.Option(help="Preset name (see `ptqlab recipes`).")] = "fp8-dynamic",
    out: Annotated[Optional[Path], typer.Option(help="Checkpoint folder to write; default ./MODEL-RECIPE.")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Layer to keep 16-bit: a name or re:REGEX; repeatable; replaces the default (lm_head).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="Group size for group-wise recipes (default: the recipe's, 128).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    dtype: Annotated[str, typer.Option(help="Load dtype: auto, bfloat16, float16, float32.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for every random choice; recorded in ptqlab.json.")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Quantize MODEL with a recipe and write a compressed-tensors checkpoint (+ tokenizer, ptqlab.json)."""
    from ptqlab.api import RECORD_NAME, quantize as run

    try:
        path = run(model, recipe, out, ignore=ignore, group_size=group_size, overwrite=overwrite, dtype=dtype, seed=seed, quiet=quiet)
    except PtqlabError as e:
        _fail(e)
    record = json.loads((path / RECORD_NAME).read_text())
    for note in record["notes"]:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(
        f"[green]wrote[/] {path} ({record['format']}: {record['quantized_layers']} layers quantized, "
        f"{len(record['ignored_layers'])} kept 16-bit) in {record['seconds']:.1f} s",
        highlight=False,
    )


@app.command()
def recipes() -> None:
    """List the preset recipes."""
    from ptqlab.recipes import PRESETS

    table = Table("recipe", "format", "keeps 16-bit", "what it does")
    for r in PRESETS.values():
        table.add_row(r.name, r.scheme.format, ", ".join(r.ignore), r.description)
    console.print(table)


def main() -> None:  # pragma: no cover
    app()
