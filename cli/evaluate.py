"""Measuring packs: ``editpack eval`` (stored in the pack and its card), ``verify`` (``--rerun``: the card's
claims measured again) and ``bench`` (each record edited on its own)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from editpack._io import atomic_write_json
from editpack.api import edit
from editpack.chat import chat_facts, check_plain_routing
from editpack.evaluation.protocols import PROTOCOLS, bench_edits, format_table
from editpack.evaluation.report import evaluate_and_store
from editpack.evaluation.report import rerun as rerun_claims
from editpack.facts import load_facts
from editpack.methods import REGISTRY
from editpack.packs.card import card_matches
from editpack.runtime.checks import check_fingerprint

from .common import (
    check_corpus,
    check_settings,
    friendly_errors,
    load_from_options,
    load_packs,
    model_options,
    parse_set,
    protocol_option,
)


@click.command("eval")
@click.argument("pack")
@model_options
@click.option("--data", default=None, metavar="[FORMAT:]PATH", help="Evaluate on these facts instead of the pack's.")
@click.option("--limit", type=click.IntRange(1), default=None, help="First N records of --data.")
@protocol_option
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@click.option("--force", is_flag=True, default=False,
              help="Evaluate even if the pack's base fingerprint does not match.")
@click.option("--chat", is_flag=True, default=False,
              help="With --data: put its facts in the model's chat template first, as a pack "
              "edited with --chat holds its own.")
@friendly_errors
def eval_cmd(pack, model_opts, data, limit, protocols, as_json, force, chat):
    """Measure PACK before/after, store the results in its manifest and regenerate its card."""
    if chat and not data:
        raise click.UsageError("--chat puts --data's facts in chat form; a pack's own facts are in the form they "
                               "were edited in")
    facts = load_facts(data, limit=limit, skip_invalid=True) if data else None
    (loaded,) = load_packs([pack])
    lm, tokenizer = load_from_options(model_opts, [loaded])
    if not force and loaded.holds_weights:
        check_fingerprint(lm, loaded)
    result, stored = evaluate_and_store(lm, tokenizer, loaded, facts, data=data, protocols=protocols or PROTOCOLS,
                                        chat=chat)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if not stored:  # read in place from the Hugging Face cache, which must not be written to
        click.echo(f"results not stored: {pack} is read from the Hugging Face cache; `editpack pull {pack} -o DIR` "
                   "and evaluate DIR to store them in the pack", err=True)
    elif not as_json:
        click.echo(f"results written to {loaded.path / 'editpack.json'} and its card README.md")


@click.command("verify")
@click.argument("pack")
@model_options
@click.option("--rerun", is_flag=True, default=False,
              help="Measure the pack again here and compare every number its card claims.")
@click.option("--data", default=None, metavar="[FORMAT:]PATH",
              help="With --rerun: the data the pack was evaluated on, when that was not its own facts.")
@click.option("--limit", type=click.IntRange(1), default=None, help="First N records of --data.")
@friendly_errors
def verify_cmd(pack, model_opts, rerun, data, limit):
    """Check PACK: its files, adapter and card; with --rerun also the card's numbers, measured again here.

    Without --rerun: every file's hash, the adapter against the manifest, and the card against the manifest's
    evaluation (and, with --model, the base fingerprint). With --rerun the evaluation is repeated with the same
    protocols, probes, suites and settings and each claim is compared within its tolerance.
    """
    (loaded,) = load_packs([pack])  # hashes, names, links, adapter and content: refused on any problem
    click.echo(f"{loaded.ref}: files, adapter and manifest verify")
    card = (loaded.path / "README.md").read_text(encoding="utf-8")
    if not card_matches(card, loaded):
        raise click.ClickException(f"{pack}: README.md is not the card of this manifest (its text was changed); the "
                                   "numbers in editpack.json are the pack's claims")
    click.echo(f"{loaded.ref}: the card is the manifest's")
    if (model_opts["model"] or rerun) and loaded.holds_weights:
        lm, tokenizer = load_from_options(model_opts, [loaded])
        check_fingerprint(lm, loaded)
        click.echo(f"{loaded.ref}: base fingerprint matches {lm.editpack_ref.id}")
    if not rerun:
        return
    if not loaded.holds_weights:
        lm, tokenizer = load_from_options(model_opts, [loaded])
    facts = load_facts(data, limit=limit, skip_invalid=True) if data else None
    checks = rerun_claims(lm, tokenizer, loaded, facts)
    failed = [c for c in checks if not c.ok]
    click.echo(f"{loaded.ref}: {len(checks) - len(failed)} of {len(checks)} claims reproduced")
    if failed:
        raise click.ClickException(f"{len(failed)} claim(s) of {pack}'s card do not reproduce here:\n  "
                                   + "\n  ".join(str(c) for c in failed))


@click.command("bench")
@model_options
@click.option("--method", default="rome", show_default=True, type=click.Choice(sorted(REGISTRY)))
@click.option("--data", required=True, metavar="[FORMAT:]PATH", help="Facts to edit one at a time.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH", help="Key-statistics corpus.")
@click.option("--set", "settings", multiple=True, default=(), metavar="KEY=VALUE", help="Method hyper-parameters.")
@protocol_option
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON here.")
@click.option("--chat", is_flag=True, default=False,
              help="Edit and score the records in the model's chat template (weight methods).")
@friendly_errors
def bench_cmd(model_opts, method, data, limit, corpus, settings, protocols, as_json, out, chat):
    """Edit each record on its own (model restored between) and report all protocols, time and memory."""
    hparams = parse_set(settings)
    if corpus and REGISTRY[method].takes("stats_corpus"):
        hparams["stats_corpus"] = check_corpus(corpus)
    check_settings(method, hparams)
    if out and not Path(out).resolve().parent.is_dir():
        raise click.BadParameter(f"{Path(out).parent} is not a directory", param_hint="--out")
    if chat:  # before the model loads
        check_plain_routing([REGISTRY[method]])
    facts = load_facts(data, limit=limit, skip_invalid=True)
    lm, tokenizer = load_from_options(model_opts)
    if chat:
        facts = chat_facts(tokenizer, facts)
    result = bench_edits(lm, tokenizer, facts, lambda fact: edit(lm, fact, method, tokenizer=tokenizer, **hparams),
                         protocols=protocols or PROTOCOLS)
    result.update({"method": method, "model": lm.editpack_ref.id, "data": data, **({"form": "chat"} if chat else {}),
                   "hyperparameters": hparams})
    if out:
        atomic_write_json(out, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_table(result))
        click.echo(f"seconds per edit: {result['seconds_per_edit']['mean']}  peak RSS: {result['peak_rss_mib']} MiB")


#: The commands of this module, in the order ``editpack --help`` lists them.
COMMANDS = [eval_cmd, verify_cmd, bench_cmd]
