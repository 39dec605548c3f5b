"""Key statistics as artifacts: ``editpack stats compute`` (written, and kept in the local cache) and ``stats list``
(what the cache holds). ``push``, ``pull`` and ``show`` take them as they take packs."""

from __future__ import annotations

import json

import click

from editpack.api import compute_stats
from editpack.methods import REGISTRY
from editpack.model.stats import CORPUS_STATS_TOKENS, SAMPLED_STATS_TOKENS
from editpack.packs.manifest import check_name, check_version
from editpack.packs.statistics import listing

from .common import (check_corpus, check_output, friendly_errors, load_from_options, model_options, parse_layers,
                     writing)


def parse_tokens(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise click.BadParameter(f"{text!r} is neither a positive number of tokens nor auto", param_hint="--tokens")
    return value


@click.group("stats")
def stats_group() -> None:
    """Key statistics (the second moments ROME, MEMIT and AlphaEdit solve under) as shareable artifacts."""


@stats_group.command("compute")
@model_options
@click.option("--method", default="rome", show_default=True,
              type=click.Choice(sorted(m for m, c in REGISTRY.items() if c.takes("stats_corpus"))),
              help="The method whose layers to compute (its default layers, or --layers).")
@click.option("--layers", default=None, help="Comma-separated layer indices (default: the method's).")
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH",
              help="Text corpus (JSONL with 'text', or plain text); default: text the model samples.")
@click.option("--tokens", default=None, metavar="N|auto",
              help=f"Keys to read, or auto: until the solved update on held-out keys stops moving (default: "
              f"{CORPUS_STATS_TOKENS:,} of a corpus, {SAMPLED_STATS_TOKENS:,} sampled from the model).")
@click.option("--name", default=None, help="Artifact name (default from the model and layers).")
@click.option("--version", "stats_version", default="1.0.0", show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace a statistics directory editpack wrote.")
@friendly_errors
def compute_cmd(model_opts, method, layers, corpus, tokens, name, stats_version, output, overwrite):
    """Compute key statistics for a model and write them as a versioned artifact (also kept in the local cache,
    so later edits of this model find them)."""
    if name:
        check_name(name)
    check_version(stats_version)
    count = parse_tokens(tokens) if tokens is not None else None
    chosen = parse_layers(layers) if layers else None
    corpus_path = check_corpus(corpus) if corpus else None
    check_output(output, overwrite)
    with writing(output):
        lm, tokenizer = load_from_options(model_opts)
        pack = compute_stats(lm, method, layers=chosen, corpus=corpus_path, tokens=count, tokenizer=tokenizer,
                             name=name, version=stats_version)
        pack.save(output, overwrite=overwrite)
    click.echo(f"wrote {pack.ref} to {output}: {pack.storage_summary()} ({pack.provenance['stopped']})")


@stats_group.command("list")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of lines.")
@friendly_errors
def list_cmd(as_json):
    """The key statistics in the local cache: model, modules, source and tokens."""
    rows = listing()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no key statistics cached yet")
    for row in rows:
        click.echo(f"{row['ref']:<40} {row['model']:<20} {row['tokens']:>9,} tokens of {row['source']}: "
                   f"{', '.join(row['modules'])}")


#: The commands of this module, in the order ``editpack --help`` lists them.
COMMANDS = [stats_group]
