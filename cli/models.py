"""``editpack models`` and ``editpack generate``: the built-in models, and continuations by a model with packs."""

from __future__ import annotations

import json

import click

from editpack.chat import chat_prompts
from editpack.model.arch import spec_for, spec_json
from editpack.model.builtins import BUILTINS, builtin_status, ensure_builtin
from editpack.model.generation import generate
from editpack.runtime.apply import apply
from editpack.runtime.pipelines import compare as compare_edits

from .common import friendly_errors, load_from_options, load_packs, model_options


@click.command("models")
@click.option("--json", "as_json", is_flag=True, default=False, help="Print JSON instead of a table.")
@click.option("--prepare", "prepare", multiple=True, default=(), metavar="NAME",
              help="Convert built-in NAME into the cache now (repeatable).")
@friendly_errors
def models_cmd(as_json: bool, prepare: tuple[str, ...]) -> None:
    """List the built-in models: installed package, cached conversion, size."""
    for name in prepare:
        if name not in BUILTINS:
            raise click.BadParameter(f"{name!r} is not a built-in model ({', '.join(BUILTINS)})", param_hint="--prepare")
        click.echo(f"{name}: {ensure_builtin(name)}", err=True)
    rows = builtin_status()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<20} {'installed':<10} {'cached':<8} {'size':>9}  description")
    for row in rows:
        size = f"{row['size_bytes'] / 2**20:.0f} MiB" if row["size_bytes"] else "-"
        name = row["name"] + (" *" if row["default"] else "")
        click.echo(f"{name:<20} {'yes' if row['installed'] else 'no':<10} {'yes' if row['cached'] else 'no':<8} "
                   f"{size:>9}  {row['description']}")
    click.echo("* default model. Install a missing one with the command in `editpack models --json` (install).")


@click.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@model_options
@click.option("--pack", "packs", multiple=True, default=(), metavar="PACK",
              help="Apply this pack first: a directory or user/name@version (repeatable, in order; unmerged).")
@click.option("--compare", is_flag=True, default=False,
              help="Show the base model's and the edited model's answers side by side.")
@click.option("--force", is_flag=True, default=False, help="Apply packs even if their base fingerprint does not match.")
@click.option("--later-wins", is_flag=True, default=False,
              help="Let a later pack override an earlier one that sets the same fact.")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(1, 4096))
@click.option("--chat", is_flag=True, default=False,
              help="Put each prompt in the model's chat template: a user turn, answered "
              "after the assistant's header, as an instruct model is served.")
@friendly_errors
def generate_cmd(prompts, model_opts, packs, compare, force, later_wins, max_new_tokens, chat) -> None:
    """Greedy continuation of each PROMPT (with --pack, by the edited model; with --chat, the answer to it)."""
    if compare and not packs:
        raise click.UsageError("--compare needs at least one --pack")
    blank = [i for i, p in enumerate(prompts, 1) if not p.strip()]
    if blank:
        raise click.UsageError(f"prompt {blank[0]} is empty: give some text to continue")
    loaded = load_packs(packs)
    lm, tokenizer = load_from_options(model_opts, loaded)
    inputs = chat_prompts(tokenizer, prompts) if chat else list(prompts)
    conflict = "later" if later_wins else "error"
    if compare:
        for prompt, row in zip(prompts, compare_edits(lm, loaded, inputs, tokenizer=tokenizer,
                                                      max_new_tokens=max_new_tokens, check=not force,
                                                      on_conflict=conflict)):
            click.echo(f"{prompt}\n  base:   {row.before!r}\n  edited: {row.after!r}")
        return
    if loaded:
        lm = apply(lm, loaded, check=not force, on_conflict=conflict)
    for prompt, text in zip(prompts, generate(lm, tokenizer, inputs, max_new_tokens=max_new_tokens)):
        click.echo(f"{prompt}\n  {text!r}" if chat else f"{prompt}{text}")


@click.command("arch")
@model_options
@friendly_errors
def arch_cmd(model_opts) -> None:
    """Print the architecture file editpack uses for a model: its family's, the one given with --arch, or the one
    it infers from the module tree (save it, adjust it, and pass it with --arch or put it in
    $EDITPACK_ARCHITECTURES)."""
    lm, _ = load_from_options(model_opts)
    click.echo(spec_json(spec_for(lm)), nl=False)


#: The commands of this module, in the order ``editpack --help`` lists them.
COMMANDS = [models_cmd, generate_cmd, arch_cmd]
