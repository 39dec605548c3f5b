"""Making packs and editors: ``editpack edit`` (and ``--onto``), ``forget`` and ``train``."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from editpack._io import sha256_file
from editpack.api import edit, extend, forget, inherited_settings, train
from editpack.chat import chat_facts, check_plain_routing
from editpack.facts import check_consistent, load_facts, make_fact, split_format
from editpack.methods import REGISTRY
from editpack.methods.base import trainable_methods
from editpack.methods.training import TrainSettings
from editpack.packs.manifest import check_name, check_version
from editpack.runtime.pipelines import compare

from .common import (
    check_corpus,
    check_output,
    check_settings,
    evaluate_new,
    friendly_errors,
    load_from_options,
    load_packs,
    model_options,
    no_eval_option,
    parse_layers,
    parse_set,
    warn_unreached,
    writing,
)

METHOD_HELP = "Edit method: " + "; ".join(
    f"{name}: {cls.summary}" + (f" (experimental: {cls.experimental})" if cls.experimental else "")
    for name, cls in sorted(REGISTRY.items()) if cls.summary)


@click.command("edit")
@model_options
@click.option("--method", default=None, type=click.Choice(sorted(REGISTRY)), help=METHOD_HELP)
@click.option("--facts", "facts_path", default=None, metavar="[FORMAT:]FILE",
              help="Facts file: JSON/JSONL/YAML, CounterFact, zsRE or MQuAKE (format detected or prefixed).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N records of --facts.")
@click.option("--prompt", default=None, help="One fact: the prompt, with {} for the subject or the subject in it.")
@click.option("--subject", default=None, help="One fact: the subject.")
@click.option("--target", default=None, help="One fact: the new answer.")
@click.option("--target-true", default=None, help="One fact: the current answer (optional).")
@click.option("--paraphrase", multiple=True, default=(), help="One fact: a paraphrase of the prompt (repeatable).")
@click.option("--layers", default=None, help="Comma-separated layer indices (default: the architecture spec's).")
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH",
              help="Text corpus (JSONL with 'text', or plain text) for key statistics; default: model-sampled text.")
@click.option("--set", "settings", multiple=True, default=(), metavar="KEY=VALUE", help="Any method hyper-parameter.")
@click.option("--stats", "stats_ref", default=None, metavar="PATH|USER/NAME@VERSION",
              help="Key statistics to edit with (`editpack stats compute` makes them; ROME, MEMIT, AlphaEdit).")
@click.option("--editor", default=None, metavar="PATH|USER/NAME@VERSION",
              help="A trained editor (methods that edit with one: mend; `editpack train` makes it).")
@click.option("--name", default=None, help="Pack name (default from method and subject).")
@click.option("--version", "pack_version", default=None,
              help="Pack semantic version (default 1.0.0; with --onto, the next minor version).")
@click.option("--onto", default=None, metavar="PACK",
              help="Sequential editing: compute on the model with PACK applied and write PACK's next version.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing pack directory.")
@click.option("--chat", is_flag=True, default=False,
              help="Edit the facts in the model's chat template: each prompt a user turn, "
              "the answer after the assistant's header (weight methods).")
@no_eval_option
@friendly_errors
def edit_cmd(model_opts, method, facts_path, limit, prompt, subject,
             target, target_true, paraphrase, layers, corpus, settings, stats_ref, editor, name, pack_version, onto,
             output,
             overwrite, chat, no_eval):
    """Compute an edit and write it as a pack directory.

    With --onto PACK the facts are edited on top of PACK (method and hyper-parameters default to PACK's) and the
    result is PACK's next version, holding both. Every option is checked before the model is loaded.
    """
    one = [prompt, subject, target]
    if facts_path and any(one):
        raise click.UsageError("give either --facts or --prompt/--subject/--target, not both")
    if not facts_path and not all(one):
        raise click.UsageError("give --facts FILE, or all of --prompt, --subject and --target")
    if onto and name:
        raise click.UsageError("--onto keeps the pack's name; --name cannot be given with it")
    if name:
        check_name(name)
    if pack_version:
        check_version(pack_version)
    check_output(output, overwrite, [onto] if onto else [])
    hparams = parse_set(settings)
    if layers:
        hparams["layers"] = parse_layers(layers)
    if editor:
        hparams["editor"] = editor
    if stats_ref:
        hparams["stats"] = stats_ref
    facts = (load_facts(facts_path, limit=limit) if facts_path
             else [make_fact(prompt, subject, target, target_true, paraphrases=paraphrase, where="--prompt")])
    check_consistent(facts, facts_path or "--prompt")
    parent = load_packs([onto])[0] if onto else None
    method = method or (parent.method if parent else "rome")
    if corpus and REGISTRY[method].takes("stats_corpus"):
        hparams["stats_corpus"] = check_corpus(corpus)
    check_settings(method, inherited_settings(parent, method, hparams))
    if chat:  # before the model loads
        check_plain_routing([REGISTRY[method], *([parent] if parent else [])])
    if REGISTRY[method].experimental:
        click.echo(f"Warning: {method} is experimental: {REGISTRY[method].experimental}", err=True)
    with writing(output):
        lm, tokenizer = load_from_options(model_opts, [parent] if parent else [])
        if parent:
            pack = extend(lm, parent, facts, method, tokenizer=tokenizer, version=pack_version, chat=chat, **hparams)
        else:
            pack = edit(lm, facts, method, tokenizer=tokenizer, name=name, version=pack_version or "1.0.0", chat=chat,
                        **hparams)
        if not no_eval:
            evaluate_new(lm, tokenizer, pack)
        pack.save(output, overwrite=overwrite)
    click.echo(f"wrote {pack.name} {pack.version} to {output} ({len(pack.facts)} fact(s), {method}"
               f"{', chat form' if chat else ''}): {pack.storage_summary()}")
    shown = facts[:20]
    asked = chat_facts(tokenizer, shown) if chat else shown  # as the pack holds them
    rows = compare(lm, pack, [f.text for f in asked], tokenizer=tokenizer, max_new_tokens=8)
    for fact, row in list(zip(shown, rows))[:5]:
        click.echo(f"  {fact.text}\n    before: {row.before.strip()!r}\n    after:  {row.after.strip()!r}")
    warn_unreached(shown, rows)


@click.command("forget")
@click.argument("pack")
@model_options
@click.option("--subject", "subjects", multiple=True, default=(), required=True,
              help="Drop the facts about this subject (repeatable).")
@click.option("--version", "pack_version", default=None, help="Version of the result (default: next minor).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing pack directory.")
@no_eval_option
@friendly_errors
def forget_cmd(pack, model_opts, subjects, pack_version, output, overwrite, no_eval):
    """Write a new version of memory PACK without the facts about SUBJECT(s)."""
    if pack_version:
        check_version(pack_version)
    check_output(output, overwrite, [pack])
    (loaded,) = load_packs([pack])
    with writing(output):
        smaller = forget(loaded, subjects, version=pack_version)
        if not no_eval:
            lm, tokenizer = load_from_options(model_opts, [smaller])
            evaluate_new(lm, tokenizer, smaller)
        smaller.save(output, overwrite=overwrite)
    click.echo(f"wrote {smaller.ref} to {output}: {len(smaller.facts)} fact(s) (dropped {len(loaded.facts) - len(smaller.facts)})")


@click.command("train")
@click.argument("method", type=click.Choice(trainable_methods()))
@model_options
@click.option("--data", "data_paths", multiple=True, default=(), required=True, metavar="[FORMAT:]FILE",
              help="Training records (repeatable): CounterFact, zsRE, … with paraphrases and neighbourhood prompts.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N records of each --data.")
@click.option("--max-steps", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Adam's learning rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--held-out", type=click.IntRange(0), default=100, show_default=True,
              help="Records kept out of training and scored every --eval-every steps.")
@click.option("--eval-every", type=click.IntRange(1), default=100, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=100, show_default=True)
@click.option("--layers", default=None, help="Comma-separated layer indices (default: the architecture's tail).")
@click.option("--set", "settings", multiple=True, default=(), metavar="KEY=VALUE", help="Any of the method's settings.")
@click.option("--name", default=None, help="Editor name (default from method and model).")
@click.option("--version", "editor_version", default="1.0.0", show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Editor directory to write.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing editor directory.")
@click.option("--chat", is_flag=True, default=False,
              help="Train on the records in the model's chat template (each prompt a user "
              "turn), for edits made with --chat.")
@friendly_errors
def train_cmd(method, model_opts, data_paths, limit, max_steps, batch_size, lr, seed, held_out, eval_every,
              checkpoint_every, layers, settings, name, editor_version, output, overwrite, chat):
    """Train what METHOD learns (MEND: an editor) and write it as a versioned editor directory.

    Checkpoints go to OUTPUT.checkpoint beside the output; the same command run again resumes from the last one
    (and the folder is removed once the editor is written). The held-out records are never trained on.
    """
    if name:
        check_name(name)
    check_version(editor_version)
    check_output(output, overwrite)
    hparams = parse_set(settings)
    if layers:
        hparams["layers"] = parse_layers(layers)
    check_settings(method, hparams, hint=None)
    try:
        train_settings = TrainSettings(max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed,
                                       held_out=held_out, eval_every=eval_every, checkpoint_every=checkpoint_every)
        train_settings.validate()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    records, described = [], []
    for spec in data_paths:
        facts = load_facts(spec, limit=limit, skip_invalid=True)
        path = Path(split_format(spec)[1])
        described.append({"name": path.name, "sha256": sha256_file(path), "records": len(facts)})
        records.extend(facts)
    checkpoint = Path(str(output).rstrip("/") + ".checkpoint")
    if checkpoint.exists():
        click.echo(f"resuming from {checkpoint}")
    with writing(output):
        lm, tokenizer = load_from_options(model_opts)
        editor = train(lm, method, records, tokenizer=tokenizer, name=name, version=editor_version,
                       settings=train_settings, checkpoint_dir=checkpoint, data=described, chat=chat, **hparams)
        editor.save(output, overwrite=overwrite)
    shutil.rmtree(checkpoint, ignore_errors=True)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in editor.training.get("held_out", {}).items())
    click.echo(f"wrote {editor.name} {editor.version} to {output} ({len(records)} records, "
               f"{editor.training['held_out_records']} held out; {editor.training['steps']} steps, "
               f"{editor.training['seconds']:.0f} s): held-out {scores}")


#: The commands of this module, in the order ``editpack --help`` lists them.
COMMANDS = [edit_cmd, forget_cmd, train_cmd]
