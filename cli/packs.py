"""Packs as files: ``editpack apply`` (merged into a model folder), ``stack``, ``export``, ``show``, ``log`` and
``diff``."""

from __future__ import annotations

import json

import click

from editpack.errors import EditpackError
from editpack.export.engines import engines, export_peft
from editpack.export.gguf import check_gguf_output, export_gguf
from editpack.export.merged import export_merged
from editpack.packs.manifest import check_name, check_version
from editpack.runtime.combine import check_mergeable, stack
from editpack.share.describe import describe
from editpack.share.history import diff, log

from .common import (
    check_output,
    evaluate_new,
    friendly_errors,
    load_from_options,
    load_packs,
    model_options,
    no_eval_option,
    writing,
)


@click.command("apply")
@model_options
@click.argument("packs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--force", is_flag=True, default=False,
              help="Apply even if a pack's base fingerprint does not match the model.")
@click.option("--later-wins", is_flag=True, default=False,
              help="Let a later pack override an earlier one that sets the same fact.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace a model folder editpack wrote before.")
@friendly_errors
def apply_cmd(model_opts, packs, output, force, later_wins, overwrite):
    """Merge PACKS (directories or user/name@version, in order) into the model; write a model folder."""
    if model_opts["load_in_4bit"] or model_opts["load_in_8bit"]:
        raise click.UsageError("a merged model is written in full precision: merging into 4/8-bit weights loses "
                               "most of the edit. Quantize when you load the merged folder, or use packs unmerged "
                               "(editpack generate --pack, editpack.apply) on a quantized model")
    check_output(output, overwrite, packs, model=model_opts["model"])
    loaded = load_packs(packs)
    try:
        check_mergeable(loaded)  # before the model is loaded
    except EditpackError as exc:
        raise click.UsageError(str(exc)) from None
    with writing(output):
        lm, tokenizer = load_from_options(model_opts, loaded)
        kept = export_merged(lm, loaded, output, tokenizer=tokenizer, check=not force,
                             on_conflict="later" if later_wins else "error", overwrite=overwrite)
    click.echo(f"wrote merged model with {len(kept)} pack(s) to {output}")


@click.command("stack")
@click.argument("packs", nargs=-1, required=True)
@model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--name", default=None, help="Name of the stacked pack (default from the first input).")
@click.option("--version", "pack_version", default="1.0.0", show_default=True, help="Its semantic version.")
@click.option("--later-wins", is_flag=True, default=False,
              help="Leave out earlier packs whose facts a later pack overrides.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an existing pack directory.")
@no_eval_option
@friendly_errors
def stack_cmd(packs, model_opts, output, name, pack_version, later_wins, overwrite, no_eval):
    """Combine PACKS into one pack whose delta is exactly their sum (ranks add; facts are the union)."""
    if name:
        check_name(name)
    check_version(pack_version)
    check_output(output, overwrite, packs)
    loaded = load_packs(packs)
    with writing(output):
        one = stack(loaded, name=name, version=pack_version, on_conflict="later" if later_wins else "error")
        if not no_eval:
            lm, tokenizer = load_from_options(model_opts, [one])
            evaluate_new(lm, tokenizer, one)
        one.save(output, overwrite=overwrite)
    sources = ", ".join(p["name"] + "@" + p["version"] for p in one.parents if p["relation"] == "stacked")
    click.echo(f"wrote {one.ref} to {output}: {len(one.facts)} fact(s) from {sources}; {one.storage_summary()}")


@click.command("export")
@click.argument("packs", nargs=-1, required=True)
@click.option("--to", "target", required=True, type=click.Choice(["gguf", *engines()]),
              help="gguf: a llama.cpp LoRA adapter (or, with --merged, a whole model); the others: a PEFT folder that "
                   "engine loads as is.")
@click.option("--output", "-o", required=True, type=click.Path(), help="The .gguf file or the adapter folder to write.")
@click.option("--base", "base_gguf", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The base model's GGUF (names and shapes are checked against it; needed for --merged).")
@click.option("--merged", is_flag=True, default=False,
              help="With --to gguf: a whole edited GGUF model instead of an adapter.")
@click.option("--model", default=None, help="The base model, for its depth (LoRAX/TGI want every layer); default: "
                                            "the packs' base.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace an export editpack wrote before.")
@click.option("--later-wins", is_flag=True, default=False,
              help="Leave out earlier packs whose facts a later pack overrides.")
@friendly_errors
def export_cmd(packs, target, output, base_gguf, merged, model, overwrite, later_wins):
    """Write PACKS (one adapter for all of them) in the form llama.cpp or a multi-LoRA server reads."""
    if merged and target != "gguf":
        raise click.UsageError("--merged writes a whole GGUF model; use it with --to gguf")
    loaded = load_packs(packs)
    conflict = "later" if later_wins else "error"
    if target == "gguf":
        try:
            check_gguf_output(output, overwrite=overwrite,
                              inputs=[*(p.path for p in loaded if p.path is not None), *([base_gguf] if base_gguf else [])])
        except FileExistsError as exc:
            raise click.UsageError(str(exc).replace("overwrite=True / --overwrite", "--overwrite")) from None
        with writing(output):
            result = export_gguf(loaded, output, base=base_gguf, merged=merged, overwrite=overwrite,
                                 on_conflict=conflict)
    else:
        check_output(output, overwrite, packs)
        with writing(output):
            result = export_peft(loaded, target, output, model=model, overwrite=overwrite, on_conflict=conflict)
    what = "merged GGUF model" if merged else ("GGUF LoRA adapter" if target == "gguf" else f"{target} adapter")
    rank = f", rank {result.rank}" if result.rank else ""
    click.echo(f"wrote {result.path}: {what} of {len(loaded)} pack(s), {len(result.modules)} module(s){rank}, "
               f"{result.bytes:,} bytes")
    for note in result.notes:
        click.echo(f"  {note}")


@click.command("show")
@click.argument("pack")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print the manifest and verification as JSON.")
@friendly_errors
def show_cmd(pack, as_json):
    """Describe a pack: facts, method, base model, files and whether they verify."""
    found = describe(pack)
    click.echo(json.dumps(found.to_dict(), indent=2) if as_json else str(found))
    if not found.verified:
        raise SystemExit(1)


@click.command("log")
@click.argument("pack")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of lines.")
@friendly_errors
def log_cmd(pack, as_json):
    """List the versions of PACK, oldest first: facts added (+), replaced (~) and removed (-), payload, size and
    recorded scores (reliability/generalization/locality per protocol).

    PACK is a Hub repository (user/name: every version tag), a pack directory (the versions it extends, found
    beside it), or a folder of pack directories of one pack.
    """
    entries = log(pack)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    for entry in entries:
        click.echo(entry.line())


@click.command("diff")
@click.argument("old")
@click.argument("new")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of lines.")
@friendly_errors
def diff_cmd(old, new, as_json):
    """What changed from pack OLD to pack NEW: facts, modules and ranks (or entries), settings, scores."""
    found = diff(old, new)
    click.echo(json.dumps(found.to_dict(), indent=2) if as_json else "\n".join(found.lines()))


#: The commands of this module, in the order ``editpack --help`` lists them.
COMMANDS = [apply_cmd, stack_cmd, export_cmd, show_cmd, log_cmd, diff_cmd]
