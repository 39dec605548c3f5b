"""``editpack`` command-line entry point."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import shutil
import signal
import sys
from pathlib import Path

import click

from editpack import __version__
from editpack.errors import EditpackError
from editpack.methods import REGISTRY
from editpack.model.loading import DTYPE_CHOICES


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``with`` block (atomic writes, locks) cleans up."""


def _terminate(signum, frame):  # pragma: no cover - exercised by a subprocess test
    raise Terminated()


def friendly_errors(func):
    """Turn editpack's own errors and bad input into a one-line ``Error: ...`` and exit status 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (EditpackError, OSError, ValueError) as exc:
            raise click.ClickException(_message(exc)) from exc
        except Terminated:
            click.echo("Terminated: nothing half-written was left behind", err=True)
            sys.exit(143)

    return wrapper


def _message(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def writing(output: str):
    """Hold a lock on ``output`` for the whole command, so a second command writing it fails at once."""
    from filelock import FileLock, Timeout

    from editpack.paths import cache_dir

    key = hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest()[:24]
    lock = FileLock(str(cache_dir("locks") / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise click.ClickException(f"another editpack command is writing {output}; wait for it or choose another "
                                   "output") from None
    try:
        yield
    finally:
        lock.release()


def check_output(output: str, overwrite: bool, inputs=(), model: str | None = None) -> None:
    """Before any work: ``output`` may be written (absent, or with --overwrite a directory editpack wrote), is
    none of the command's inputs (packs, the --model folder or file) and does not hold or lie inside one, and is
    not in editpack's cache of converted models."""
    from editpack._io import check_output as check
    from editpack.model.loading import local_model_path
    from editpack.paths import cache_dir

    target = Path(output).resolve()
    paths = [getattr(item, "path", None) or (Path(item) if Path(str(item)).exists() else None) for item in inputs]
    if model:
        paths.append(local_model_path(model))
    for path in paths:
        if path is None:
            continue
        path = Path(path).resolve()
        how = ("is an input" if path == target else f"lies inside {path}, an input" if path in target.parents
               else f"holds {path}, an input" if target in path.parents else None)
        if how:
            raise click.UsageError(f"{output} {how} of this command; write the result elsewhere")
    models = cache_dir("models").resolve()
    if target == models or models in target.parents:
        raise click.UsageError(f"{output} is inside editpack's cache of converted models ({models}); write the "
                               "result elsewhere")
    try:
        check(output, overwrite=overwrite)
    except FileExistsError as exc:
        raise click.UsageError(str(exc).replace("overwrite=True / --overwrite", "--overwrite")) from None


_MODEL_KEYS = ("model", "dtype", "device_map", "load_in_4bit", "load_in_8bit", "max_memory", "offload_folder")


def parse_max_memory(values: tuple[str, ...]) -> dict | None:
    """``--max-memory cpu=2GiB --max-memory 0=20GiB`` as accelerate's ``max_memory`` mapping."""
    out: dict = {}
    for item in values:
        device, sep, size = item.partition("=")
        if not sep or not device or not size:
            raise click.BadParameter(f"{item!r} is not DEVICE=SIZE (e.g. cpu=2GiB or 0=20GiB)", param_hint="--max-memory")
        out[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return out or None


def model_options(func):
    """The model-loading options every command that loads a model shares; they arrive as one ``model_opts``."""
    options = [
        click.option("--model", "-m", "model", default=None, metavar="M",
                     help="Built-in name (default smollm2-135m), local folder, .gguf file or Hub id."),
        click.option("--dtype", default="float32", show_default=True,
                     type=click.Choice(DTYPE_CHOICES)),
        click.option("--device-map", default=None, help="accelerate device map, e.g. auto, cpu or sequential."),
        click.option("--max-memory", multiple=True, metavar="DEVICE=SIZE",
                     help="With --device-map: memory budget per device, e.g. cpu=2GiB (repeatable)."),
        click.option("--offload-folder", default=None, type=click.Path(file_okay=False),
                     help="With --device-map: where layers that fit nowhere are offloaded to disk."),
        click.option("--load-in-4bit", is_flag=True, help="Quantize to 4 bits with bitsandbytes (packs stay unmerged)."),
        click.option("--load-in-8bit", is_flag=True, help="Quantize to 8 bits with bitsandbytes (packs stay unmerged)."),
    ]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from editpack.model.loading import check_placement

        opts = {key: kwargs.pop(key) for key in _MODEL_KEYS}
        opts["max_memory"] = parse_max_memory(opts["max_memory"])
        try:
            check_placement(opts["device_map"], opts["max_memory"], opts["offload_folder"])
        except ValueError as exc:
            message = str(exc)
            for name in ("max_memory", "offload_folder", "device_map"):
                message = message.replace(name, "--" + name.replace("_", "-"))
            raise click.UsageError(message) from None
        return func(*args, model_opts=opts, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def no_eval_option(func):
    return click.option("--no-eval", "no_eval", is_flag=True,
                        help="Skip the evaluation at creation (the card then says it was not evaluated).")(func)


def load_from_options(opts: dict, packs=()):
    """Load the model ``opts`` names, or (when --model is not given) the base model the first of ``packs`` records."""
    from editpack.model.loading import load_model

    options = dict(opts)
    name = options.pop("model") or packs_model(list(packs))
    return load_model(name, **options)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="editpack")
@click.option("--verbose", "-v", is_flag=True, help="Show the libraries' warnings and log messages too.")
def main(verbose: bool) -> None:
    """Knowledge edits of language models as versioned, shareable packs."""
    import logging

    from editpack import console

    console.configure(verbose)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("editpack")
    log.handlers = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    with contextlib.suppress(ValueError):  # only the main thread may set handlers (not under some test runners)
        signal.signal(signal.SIGTERM, _terminate)


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--prepare", "prepare", multiple=True, metavar="NAME",
              help="Convert built-in NAME into the cache now (repeatable).")
@friendly_errors
def models_cmd(as_json: bool, prepare: tuple[str, ...]) -> None:
    """List the built-in models: installed package, cached conversion, size."""
    from editpack.model.loading import BUILTINS, builtin_status, ensure_builtin

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
@click.option("--pack", "packs", multiple=True, metavar="PACK",
              help="Apply this pack first: a directory or user/name@version (repeatable, in order; unmerged).")
@click.option("--compare", is_flag=True, help="Show the base model's and the edited model's answers side by side.")
@click.option("--force", is_flag=True, help="Apply packs even if their base fingerprint does not match.")
@click.option("--later-wins", is_flag=True, help="Let a later pack override an earlier one that sets the same fact.")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(1, 4096))
@click.option("--chat", is_flag=True, help="Put each prompt in the model's chat template: a user turn, answered "
              "after the assistant's header, as an instruct model is served.")
@friendly_errors
def generate_cmd(prompts, model_opts, packs, compare, force, later_wins, max_new_tokens, chat) -> None:
    """Greedy continuation of each PROMPT (with --pack, by the edited model; with --chat, the answer to it)."""
    from editpack.runtime.apply import apply
    from editpack.chat import chat_prompts
    from editpack.model.generation import generate
    from editpack.runtime.pipelines import compare as compare_edits

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


# ------------------------------------------------------------------------------------------------ packs
def parse_set(values: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs; values are JSON when they parse as JSON, else strings."""
    from editpack.methods.base import parse_settings

    try:
        return parse_settings(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


def packs_model(packs) -> str | None:
    """The base model the first pack records (loaded when --model is not given): a built-in or a Hub id.

    Packs record no local paths, so a base that was a local folder or GGUF file must be named with --model.
    """
    if not packs:
        return None
    from editpack.model.loading import BUILTINS

    base = packs[0].base
    if base.id in BUILTINS or base.hub_id == base.id or Path(base.id).exists():
        return base.id
    raise click.UsageError(f"{packs[0].ref} was made on {base.id!r}, a local model on the machine that made it; "
                           "pass --model with that model's folder or file here")


def load_packs(references) -> list:
    """Packs from directories or ``user/name@version`` Hub references."""
    from editpack.share.hub import resolve_pack

    return [resolve_pack(r) for r in references]


METHOD_HELP = "Edit method: " + "; ".join(f"{name}: {cls.summary}" for name, cls in sorted(REGISTRY.items()) if cls.summary)


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of layer indices like 4,5,6",
                                 param_hint="--layers") from None
    if any(layer < 0 for layer in layers):
        raise click.BadParameter(f"layer indices must be 0 or more, not {text!r}", param_hint="--layers")
    return layers


def gathers_statistics(method: str) -> bool:
    """Whether ``method`` takes a key-statistics corpus (``--corpus`` / ``EDITPACK_CORPUS`` go only to those)."""
    return "stats_corpus" in {f.name for f in dataclasses.fields(REGISTRY[method].config_class)}


def check_corpus(path: str) -> str:
    from editpack.model.stats import check_corpus_file

    try:
        return str(check_corpus_file(path).resolve())
    except EditpackError as exc:
        raise click.BadParameter(str(exc).removeprefix("corpus "), param_hint="--corpus") from None


@main.command("edit")
@model_options
@click.option("--method", default=None, type=click.Choice(sorted(REGISTRY)), help=METHOD_HELP)
@click.option("--facts", "facts_path", default=None, metavar="[FORMAT:]FILE",
              help="Facts file: JSON/JSONL/YAML, CounterFact, zsRE or MQuAKE (format detected or prefixed).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N records of --facts.")
@click.option("--prompt", default=None, help="One fact: the prompt, with {} for the subject or the subject in it.")
@click.option("--subject", default=None, help="One fact: the subject.")
@click.option("--target", default=None, help="One fact: the new answer.")
@click.option("--target-true", default=None, help="One fact: the current answer (optional).")
@click.option("--paraphrase", multiple=True, help="One fact: a paraphrase of the prompt (repeatable).")
@click.option("--layers", default=None, help="Comma-separated layer indices (default: the architecture spec's).")
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH",
              help="Text corpus (JSONL with 'text', or plain text) for key statistics; default: model-sampled text.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any method hyper-parameter.")
@click.option("--editor", default=None, metavar="PATH|USER/NAME@VERSION",
              help="A trained editor (methods that edit with one: mend; `editpack train` makes it).")
@click.option("--name", default=None, help="Pack name (default from method and subject).")
@click.option("--version", "pack_version", default=None,
              help="Pack semantic version (default 1.0.0; with --onto, the next minor version).")
@click.option("--onto", default=None, metavar="PACK",
              help="Sequential editing: compute on the model with PACK applied and write PACK's next version.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing pack directory.")
@click.option("--chat", is_flag=True, help="Edit the facts in the model's chat template: each prompt a user turn, "
              "the answer after the assistant's header (weight methods).")
@no_eval_option
@friendly_errors
def edit_cmd(model_opts, method, facts_path, limit, prompt, subject,
             target, target_true, paraphrase, layers, corpus, settings, editor, name, pack_version, onto, output,
             overwrite, chat, no_eval):
    """Compute an edit and write it as a pack directory.

    With --onto PACK the facts are edited on top of PACK (method and hyper-parameters default to PACK's) and the
    result is PACK's next version, holding both. Every option is checked before the model is loaded.
    """
    from editpack.api import edit, extend, method_config
    from editpack.packs.artifact import check_name, check_version
    from editpack.chat import chat_facts, check_plain_routing
    from editpack.facts import check_consistent, load_facts, make_fact
    from editpack.runtime.pipelines import compare

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
    facts = (load_facts(facts_path, limit=limit) if facts_path
             else [make_fact(prompt, subject, target, target_true, paraphrases=paraphrase, where="--prompt")])
    check_consistent(facts, facts_path or "--prompt")
    parent = load_packs([onto])[0] if onto else None
    method = method or (parent.method if parent else "rome")
    if corpus and gathers_statistics(method):
        hparams["stats_corpus"] = check_corpus(corpus)
    try:
        method_config(method, **({**(parent.hyperparameters if parent and method == parent.method
                                     and "stacked" not in parent.hyperparameters else {}), **hparams}))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
    if chat:  # before the model loads
        check_plain_routing([REGISTRY[method], *([parent] if parent else [])])
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


def evaluate_new(lm, tokenizer, pack) -> None:
    """Evaluate a new pack before it is saved (its card then carries the results); say how long it took."""
    from editpack.evaluation.report import evaluate_pack

    pack.evaluation = evaluate_pack(lm, tokenizer, pack)
    side = pack.evaluation.get("side_effects") or {}
    click.echo(f"evaluated in {pack.evaluation['seconds']:.1f} s: {side.get('verdict', 'no side effects measured')}")


def warn_unreached(facts, rows) -> None:
    """Say so when the edited model's greedy answer does not start with the new target."""
    from editpack.evaluation.protocols import starts_with

    missed = [(f, r) for f, r in zip(facts, rows) if not starts_with(r.after, f.target_new)]
    if missed:
        named = "; ".join(f"{f.text!r} -> {r.after.strip()!r} (wanted {f.target_new!r})" for f, r in missed[:3])
        click.echo(f"Warning: {len(missed)} of {len(facts)} checked fact(s) do not start with their new target in "
                   f"greedy generation: {named}. `editpack eval` measures the edit with every protocol.", err=True)


@main.command("apply")
@model_options
@click.argument("packs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--force", is_flag=True, help="Apply even if a pack's base fingerprint does not match the model.")
@click.option("--later-wins", is_flag=True, help="Let a later pack override an earlier one that sets the same fact.")
@click.option("--overwrite", is_flag=True, help="Replace a model folder editpack wrote before.")
@friendly_errors
def apply_cmd(model_opts, packs, output, force, later_wins, overwrite):
    """Merge PACKS (directories or user/name@version, in order) into the model; write a model folder."""
    from editpack.runtime.apply import check_mergeable, export_merged

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


@main.command("stack")
@click.argument("packs", nargs=-1, required=True)
@model_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--name", default=None, help="Name of the stacked pack (default from the first input).")
@click.option("--version", "pack_version", default="1.0.0", show_default=True, help="Its semantic version.")
@click.option("--later-wins", is_flag=True, help="Leave out earlier packs whose facts a later pack overrides.")
@click.option("--overwrite", is_flag=True, help="Replace an existing pack directory.")
@no_eval_option
@friendly_errors
def stack_cmd(packs, model_opts, output, name, pack_version, later_wins, overwrite, no_eval):
    """Combine PACKS into one pack whose delta is exactly their sum (ranks add; facts are the union)."""
    from editpack.runtime.apply import stack
    from editpack.packs.artifact import check_name, check_version

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


@main.command("forget")
@click.argument("pack")
@model_options
@click.option("--subject", "subjects", multiple=True, required=True, help="Drop the facts about this subject (repeatable).")
@click.option("--version", "pack_version", default=None, help="Version of the result (default: next minor).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing pack directory.")
@no_eval_option
@friendly_errors
def forget_cmd(pack, model_opts, subjects, pack_version, output, overwrite, no_eval):
    """Write a new version of memory PACK without the facts about SUBJECT(s)."""
    from editpack.api import forget
    from editpack.packs.artifact import check_version

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


# ------------------------------------------------------------------------------------------------ the Hub
@main.command("export")
@click.argument("packs", nargs=-1, required=True)
@click.option("--to", "target", required=True, type=click.Choice(["gguf", "vllm", "sglang", "lorax", "tgi"]),
              help="gguf: a llama.cpp LoRA adapter (or, with --merged, a whole model); the others: a PEFT folder that "
                   "engine loads as is.")
@click.option("--output", "-o", required=True, type=click.Path(), help="The .gguf file or the adapter folder to write.")
@click.option("--base", "base_gguf", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The base model's GGUF (names and shapes are checked against it; needed for --merged).")
@click.option("--merged", is_flag=True, help="With --to gguf: a whole edited GGUF model instead of an adapter.")
@click.option("--model", default=None, help="The base model, for its depth (LoRAX/TGI want every layer); default: "
                                            "the packs' base.")
@click.option("--overwrite", is_flag=True, help="Replace an export editpack wrote before.")
@click.option("--later-wins", is_flag=True, help="Leave out earlier packs whose facts a later pack overrides.")
@friendly_errors
def export_cmd(packs, target, output, base_gguf, merged, model, overwrite, later_wins):
    """Write PACKS (one adapter for all of them) in the form llama.cpp or a multi-LoRA server reads."""
    from editpack.export.formats import check_gguf_output, export_gguf, export_peft

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


@main.command("ui")
@click.option("--packs", "packs_dir", default=None, type=click.Path(file_okay=False),
              help="Folder of packs to offer; new edits are saved here (default: $EDITPACK_HOME/playground).")
@click.option("--model", default=None, help="Model to load (default: the default built-in).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (this machine only by default).")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(1, 65535))
@click.option("--no-eval", is_flag=True, help="Save new edits without evaluating them (faster, cards without scores).")
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH", help="Key-statistics corpus.")
@friendly_errors
def ui_cmd(packs_dir, model, host, port, no_eval, corpus):
    """A local web page: browse packs and their cards, switch them on and off, compare, and edit."""
    try:
        import uvicorn

        from editpack.ui.app import allowed_hosts, create_app
    except ImportError as exc:
        raise click.ClickException(f"the playground needs its extra ({exc.name} is missing): "
                                   "pip install 'editpack[ui]'") from None
    from editpack.model.loading import load_model
    from editpack.paths import cache_dir
    from editpack.ui import Playground

    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"Warning: binding {host}: anyone who can reach it can run edits on this machine.", err=True)
    lm, tokenizer = load_model(model)
    folder = Path(packs_dir) if packs_dir else cache_dir("playground")
    playground = Playground(lm, tokenizer, folder, evaluate=not no_eval,
                            corpus=check_corpus(corpus) if corpus else None)
    click.echo(f"editpack playground on http://{host}:{port}/ ({lm.editpack_ref.id}; packs in {folder}); Ctrl+C stops")
    uvicorn.run(create_app(playground, hosts=allowed_hosts(host)), host=host, port=port, log_level="warning")


@main.command("train")
@click.argument("method", type=click.Choice(sorted(m for m, c in REGISTRY.items() if hasattr(c, "learner"))))
@model_options
@click.option("--data", "data_paths", multiple=True, required=True, metavar="[FORMAT:]FILE",
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
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any of the method's settings.")
@click.option("--name", default=None, help="Editor name (default from method and model).")
@click.option("--version", "editor_version", default="1.0.0", show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Editor directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing editor directory.")
@click.option("--chat", is_flag=True, help="Train on the records in the model's chat template (each prompt a user "
              "turn), for edits made with --chat.")
@friendly_errors
def train_cmd(method, model_opts, data_paths, limit, max_steps, batch_size, lr, seed, held_out, eval_every,
              checkpoint_every, layers, settings, name, editor_version, output, overwrite, chat):
    """Train what METHOD learns (MEND: an editor) and write it as a versioned editor directory.

    Checkpoints go to OUTPUT.checkpoint beside the output; the same command run again resumes from the last one
    (and the folder is removed once the editor is written). The held-out records are never trained on.
    """
    from editpack._io import sha256_file
    from editpack.api import method_config, train
    from editpack.packs.artifact import check_name, check_version
    from editpack.facts import load_facts, split_format
    from editpack.methods.training import TrainSettings

    if name:
        check_name(name)
    check_version(editor_version)
    check_output(output, overwrite)
    hparams = parse_set(settings)
    if layers:
        hparams["layers"] = parse_layers(layers)
    try:
        method_config(method, **hparams)
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


@main.command("push")
@click.argument("pack")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (if it does not exist yet).")
@click.option("--message", default=None, help="Commit message (default: pack name and version).")
@friendly_errors
def push_cmd(pack, repo_id, private, message):
    """Upload PACK to the Hub model repository REPO_ID (user/name) as one commit tagged v<version>."""
    from editpack.share.hub import push

    result = push(pack, repo_id, private=private, message=message)
    if result.created:
        click.echo(f"pushed {load_packs([pack])[0].name} {result.version} to {result.repo_id} "
                   f"(tag {result.tag}, commit {result.commit[:12]})")
    else:
        click.echo(f"{result.repo_id} already has {result.tag} with this content (commit {result.commit[:12]}); "
                   "nothing to do")


@main.command("pull")
@click.argument("reference")
@click.option("--output", "-o", default=None, type=click.Path(file_okay=False),
              help="Copy the verified pack here (default: use it in place in the Hugging Face cache).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@friendly_errors
def pull_cmd(reference, output, overwrite):
    """Download REFERENCE (user/name[@1.2.0|@branch|@commit]) and verify every file against its manifest."""
    from editpack.share.hub import pull

    pack = pull(reference, output, overwrite=overwrite)
    click.echo(f"{pack.name} {pack.version}: {len(pack.facts)} fact(s), verified, at {pack.path}")


@main.command("versions")
@click.argument("repo_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def versions_cmd(repo_id, as_json):
    """List the versions of the pack in REPO_ID with their dates and commits."""
    from dataclasses import asdict

    from editpack.share.hub import versions

    found = versions(repo_id)
    if as_json:
        click.echo(json.dumps([asdict(v) for v in found], indent=2))
        return
    if not found:
        click.echo(f"{repo_id} has no versions yet")
    for v in found:
        click.echo(f"{v.version:<12} {v.tag:<13} {v.date or '-':<26} {v.commit}")


@main.command("log")
@click.argument("pack")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@friendly_errors
def log_cmd(pack, as_json):
    """List the versions of PACK, oldest first: facts added (+), replaced (~) and removed (-), payload, size and
    recorded scores (reliability/generalization/locality per protocol).

    PACK is a Hub repository (user/name: every version tag), a pack directory (the versions it extends, found
    beside it), or a folder of pack directories of one pack.
    """
    from editpack.share.history import log

    entries = log(pack)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    for entry in entries:
        click.echo(entry.line())


@main.command("diff")
@click.argument("old")
@click.argument("new")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@friendly_errors
def diff_cmd(old, new, as_json):
    """What changed from pack OLD to pack NEW: facts, modules and ranks (or entries), settings, scores."""
    from editpack.share.history import diff

    found = diff(old, new)
    click.echo(json.dumps(found.to_dict(), indent=2) if as_json else "\n".join(found.lines()))


@main.command("show")
@click.argument("pack")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and verification as JSON.")
@friendly_errors
def show_cmd(pack, as_json):
    """Describe a pack: facts, method, base model, files and whether they verify."""
    from editpack.share.describe import describe

    found = describe(pack)
    click.echo(json.dumps(found.to_dict(), indent=2) if as_json else str(found))
    if not found.verified:
        raise SystemExit(1)


def protocol_option(func):
    from editpack.evaluation.protocols import PROTOCOLS

    return click.option("--protocol", "protocols", multiple=True, type=click.Choice(PROTOCOLS),
                        help="Protocol(s) to report (default: all three).")(func)


@main.command("eval")
@click.argument("pack")
@model_options
@click.option("--data", default=None, metavar="[FORMAT:]PATH", help="Evaluate on these facts instead of the pack's.")
@click.option("--limit", type=click.IntRange(1), default=None, help="First N records of --data.")
@protocol_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--force", is_flag=True, help="Evaluate even if the pack's base fingerprint does not match.")
@click.option("--chat", is_flag=True, help="With --data: put its facts in the model's chat template first, as a pack "
              "edited with --chat holds its own.")
@friendly_errors
def eval_cmd(pack, model_opts, data, limit, protocols, as_json, force, chat):
    """Measure PACK before/after, store the results in its manifest and regenerate its card."""
    from editpack.runtime.apply import check_fingerprint
    from editpack.evaluation.protocols import PROTOCOLS, format_table
    from editpack.evaluation.report import evaluate_and_store
    from editpack.facts import load_facts

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


@main.command("verify")
@click.argument("pack")
@model_options
@click.option("--rerun", is_flag=True, help="Measure the pack again here and compare every number its card claims.")
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
    from editpack.runtime.apply import check_fingerprint
    from editpack.packs.card import card_matches
    from editpack.facts import load_facts
    from editpack.evaluation.report import rerun as rerun_claims

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


@main.command("bench")
@model_options
@click.option("--method", default="rome", show_default=True, type=click.Choice(sorted(REGISTRY)))
@click.option("--data", required=True, metavar="[FORMAT:]PATH", help="Facts to edit one at a time.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH", help="Key-statistics corpus.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method hyper-parameters.")
@protocol_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON here.")
@click.option("--chat", is_flag=True, help="Edit and score the records in the model's chat template (weight methods).")
@friendly_errors
def bench_cmd(model_opts, method, data, limit, corpus, settings, protocols, as_json, out, chat):
    """Edit each record on its own (model restored between) and report all protocols, time and memory."""
    from editpack._io import atomic_write_json
    from editpack.api import edit
    from editpack.api import method_config
    from editpack.chat import chat_facts, check_plain_routing
    from editpack.evaluation.protocols import PROTOCOLS, bench_edits, format_table
    from editpack.facts import load_facts

    hparams = parse_set(settings)
    if corpus and gathers_statistics(method):
        hparams["stats_corpus"] = check_corpus(corpus)
    try:
        method_config(method, **hparams)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
