"""``editpack`` command-line entry point."""

from __future__ import annotations

import functools
import json
import sys

import click

from editpack import __version__
from editpack.errors import EditpackError


def friendly_errors(func):
    """Turn editpack's own errors into a one-line ``Error: ...`` and exit status 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (EditpackError, FileExistsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def model_options(func):
    """The model-loading options every command that loads a model shares."""
    options = [
        click.option("--model", "-m", "model", default=None, metavar="M",
                     help="Built-in name (default smollm2-135m), local folder, .gguf file or Hub id."),
        click.option("--dtype", default="float32", show_default=True,
                     type=click.Choice(["float32", "bfloat16", "float16", "auto"])),
        click.option("--device-map", default=None, help="accelerate device map, e.g. auto or cpu."),
        click.option("--load-in-4bit", is_flag=True, help="Quantize to 4 bits with bitsandbytes."),
        click.option("--load-in-8bit", is_flag=True, help="Quantize to 8 bits with bitsandbytes."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_from_options(model, dtype, device_map, load_in_4bit, load_in_8bit):
    from editpack.models import load_model

    return load_model(model, dtype=dtype, device_map=device_map, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="editpack")
def main() -> None:
    """Knowledge edits of language models as versioned, shareable packs."""


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--prepare", "prepare", multiple=True, metavar="NAME",
              help="Convert built-in NAME into the cache now (repeatable).")
@friendly_errors
def models_cmd(as_json: bool, prepare: tuple[str, ...]) -> None:
    """List the built-in models: installed package, cached conversion, size."""
    from editpack.models import BUILTINS, builtin_status, ensure_builtin

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


@main.command("generate")
@click.argument("prompts", nargs=-1, required=True)
@model_options
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(1, 4096))
@friendly_errors
def generate_cmd(prompts, model, dtype, device_map, load_in_4bit, load_in_8bit, max_new_tokens) -> None:
    """Greedy continuation of each PROMPT."""
    from editpack.generation import generate

    lm, tokenizer = load_from_options(model, dtype, device_map, load_in_4bit, load_in_8bit)
    for prompt, text in zip(prompts, generate(lm, tokenizer, list(prompts), max_new_tokens=max_new_tokens)):
        click.echo(f"{prompt}{text}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
