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
                     type=click.Choice(["float32", "bfloat16", "float16", "auto"])),
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
        opts = {key: kwargs.pop(key) for key in _MODEL_KEYS}
        opts["max_memory"] = parse_max_memory(opts["max_memory"])
        return func(*args, model_opts=opts, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def load_from_options(opts: dict, model: str | None = None):
    """Load the model ``opts`` name (or ``model``, the packs' base, when --model is not given)."""
    from editpack.models import load_model

    options = dict(opts)
    name = options.pop("model") or model
    return load_model(name, **options)


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
@click.option("--pack", "packs", multiple=True, metavar="PACK",
              help="Apply this pack first: a directory or user/name@version (repeatable, in order; unmerged).")
@click.option("--compare", is_flag=True, help="Show the base model's and the edited model's answers side by side.")
@click.option("--force", is_flag=True, help="Apply packs even if their base fingerprint does not match.")
@click.option("--later-wins", is_flag=True, help="Let a later pack override an earlier one that sets the same fact.")
@click.option("--max-new-tokens", default=20, show_default=True, type=click.IntRange(1, 4096))
@friendly_errors
def generate_cmd(prompts, model_opts, packs, compare, force, later_wins, max_new_tokens) -> None:
    """Greedy continuation of each PROMPT (with --pack, by the edited model)."""
    from editpack.apply import apply
    from editpack.generation import generate

    if compare and not packs:
        raise click.UsageError("--compare needs at least one --pack")
    loaded = load_packs(packs)
    lm, tokenizer = load_from_options(model_opts, packs_model(loaded))
    before = generate(lm, tokenizer, list(prompts), max_new_tokens=max_new_tokens) if compare else None
    if loaded:
        lm = apply(lm, loaded, check=not force, on_conflict="later" if later_wins else "error")
    after = generate(lm, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    for i, prompt in enumerate(prompts):
        if compare:
            click.echo(f"{prompt}\n  base:   {before[i]!r}\n  edited: {after[i]!r}")
        else:
            click.echo(f"{prompt}{after[i]}")


# ------------------------------------------------------------------------------------------------ packs
def parse_set(values: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs; values are JSON when they parse as JSON, else strings."""
    from editpack.methods.base import parse_settings

    try:
        return parse_settings(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


def packs_model(packs) -> str | None:
    """The base model the first pack records (loaded when --model is not given)."""
    return packs[0].base.id if packs else None


def load_packs(references) -> list:
    """Packs from directories or ``user/name@version`` Hub references."""
    from editpack.hub import resolve_pack

    return [resolve_pack(r) for r in references]


@main.command("edit")
@model_options
@click.option("--method", default=None, help="Edit method: rome (default), memit, alphaedit, ft, lora.")
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
@click.option("--name", default=None, help="Pack name (default from method and subject).")
@click.option("--version", "pack_version", default=None,
              help="Pack semantic version (default 1.0.0; with --onto, the next minor version).")
@click.option("--onto", default=None, metavar="PACK",
              help="Sequential editing: compute on the model with PACK applied and write PACK's next version.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing pack directory.")
@friendly_errors
def edit_cmd(model_opts, method, facts_path, limit, prompt, subject,
             target, target_true, paraphrase, layers, corpus, settings, name, pack_version, onto, output, overwrite):
    """Compute an edit and write it as a pack directory.

    Methods: rome, memit, alphaedit, ft (FT-M), lora. With --onto PACK the facts are edited on top of PACK
    (method and hyper-parameters default to PACK's) and the result is PACK's next version, holding both.
    """
    from pathlib import Path

    from editpack.api import edit, extend
    from editpack.facts import load_facts, make_fact
    from editpack.generation import generate
    from editpack.methods import get_method
    from editpack.pack import check_version

    one = [prompt, subject, target]
    if facts_path and any(one):
        raise click.UsageError("give either --facts or --prompt/--subject/--target, not both")
    if not facts_path and not all(one):
        raise click.UsageError("give --facts FILE, or all of --prompt, --subject and --target")
    if Path(output).exists() and not overwrite:
        raise click.UsageError(f"{output} already exists (use --overwrite to replace it)")
    if onto and name:
        raise click.UsageError("--onto keeps the pack's name; --name cannot be given with it")
    parent = load_packs([onto])[0] if onto else None
    method = method or (parent.method if parent else "rome")
    get_method(method)
    if pack_version:
        check_version(pack_version)
    facts = (load_facts(facts_path, limit=limit) if facts_path
             else [make_fact(prompt, subject, target, target_true, paraphrases=paraphrase, where="--prompt")])
    hparams = parse_set(settings)
    if layers:
        hparams["layers"] = [int(x) for x in layers.split(",")]
    if corpus:
        hparams["stats_corpus"] = corpus
    lm, tokenizer = load_from_options(model_opts, packs_model([parent] if parent else []))
    if parent:
        pack = extend(lm, parent, facts, method, tokenizer=tokenizer, version=pack_version, **hparams)
    else:
        pack = edit(lm, facts, method, tokenizer=tokenizer, name=name, version=pack_version or "1.0.0", **hparams)
    pack.save(output, overwrite=overwrite)
    click.echo(f"wrote {pack.name} {pack.version} to {output} ({len(pack.facts)} fact(s), {method}): "
               f"{pack.storage_summary()}")
    shown = facts[:5]
    before = generate(lm, tokenizer, [f.text for f in shown], max_new_tokens=8)
    from editpack.apply import apply, revert

    edited = apply(lm, pack)
    after = generate(edited, tokenizer, [f.text for f in shown], max_new_tokens=8)
    revert(edited)
    for fact, old, new in zip(shown, before, after):
        click.echo(f"  {fact.text}\n    before: {old.strip()!r}\n    after:  {new.strip()!r}")


@main.command("apply")
@model_options
@click.argument("packs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--force", is_flag=True, help="Apply even if a pack's base fingerprint does not match the model.")
@click.option("--later-wins", is_flag=True, help="Let a later pack override an earlier one that sets the same fact.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@friendly_errors
def apply_cmd(model_opts, packs, output, force, later_wins, overwrite):
    """Merge PACKS (directories or user/name@version, in order) into the model; write a model folder."""
    from pathlib import Path

    from editpack._io import atomic_directory, atomic_write_json
    from editpack.apply import applied, apply

    if model_opts["load_in_4bit"] or model_opts["load_in_8bit"]:
        raise click.UsageError("a merged model is written in full precision: merging into 4/8-bit weights loses "
                               "most of the edit. Quantize when you load the merged folder, or use packs unmerged "
                               "(editpack generate --pack, editpack.apply) on a quantized model")
    if Path(output).exists() and not overwrite:
        raise click.UsageError(f"{output} already exists (use --overwrite to replace it)")
    loaded = load_packs(packs)
    if any(p.kind == "memory" for p in loaded):
        raise click.UsageError("memory packs leave the weights alone and cannot be merged into a model folder; use "
                               "them with editpack generate --pack, editpack.apply or editpack.pipeline")
    lm, tokenizer = load_from_options(model_opts, packs_model(loaded))
    merged = apply(lm, loaded, merge=True, check=not force, on_conflict="later" if later_wins else "error")
    kept = [r.pack for r in applied(merged)]
    with atomic_directory(output, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "editpack_applied.json", {
            "base_model": loaded[0].base.to_dict(),
            "packs": [{"name": p.name, "version": p.version, "content": p.content_id, "path": str(p.path)}
                      for p in kept],
        })
    click.echo(f"wrote merged model with {len(kept)} pack(s) to {output}")


@main.command("stack")
@click.argument("packs", nargs=-1, required=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--name", default=None, help="Name of the stacked pack (default from the first input).")
@click.option("--version", "pack_version", default="1.0.0", show_default=True, help="Its semantic version.")
@click.option("--later-wins", is_flag=True, help="Leave out earlier packs whose facts a later pack overrides.")
@click.option("--overwrite", is_flag=True, help="Replace an existing pack directory.")
@friendly_errors
def stack_cmd(packs, output, name, pack_version, later_wins, overwrite):
    """Combine PACKS into one pack whose delta is exactly their sum (ranks add; facts are the union)."""
    from pathlib import Path

    from editpack.apply import stack

    if Path(output).exists() and not overwrite:
        raise click.UsageError(f"{output} already exists (use --overwrite to replace it)")
    loaded = load_packs(packs)
    one = stack(loaded, name=name, version=pack_version, on_conflict="later" if later_wins else "error")
    one.save(output, overwrite=overwrite)
    ranks = ", ".join(f"{m} (rank {d.rank})" for m, d in sorted(one.delta.modules.items()))
    click.echo(f"wrote {one.ref} to {output}: {len(one.facts)} fact(s) from "
               f"{', '.join(p['name'] + '@' + p['version'] for p in one.parents if p['relation'] == 'stacked')}; {ranks}")


@main.command("forget")
@click.argument("pack")
@click.option("--subject", "subjects", multiple=True, required=True, help="Drop the facts about this subject (repeatable).")
@click.option("--version", "pack_version", default=None, help="Version of the result (default: next minor).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Pack directory to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing pack directory.")
@friendly_errors
def forget_cmd(pack, subjects, pack_version, output, overwrite):
    """Write a new version of memory PACK without the facts about SUBJECT(s)."""
    from pathlib import Path

    from editpack.api import next_version
    from editpack.memory import SentenceEncoder

    if Path(output).exists() and not overwrite:
        raise click.UsageError(f"{output} already exists (use --overwrite to replace it)")
    (loaded,) = load_packs([pack])
    if loaded.kind != "memory":
        raise click.UsageError(f"{pack} is a weight pack: its facts cannot be dropped one by one; re-edit instead")
    smaller = loaded.with_facts(SentenceEncoder(), remove=subjects, version=pack_version or next_version(loaded.version))
    smaller.save(output, overwrite=overwrite)
    click.echo(f"wrote {smaller.ref} to {output}: {len(smaller.facts)} fact(s) (dropped {len(loaded.facts) - len(smaller.facts)})")


# ------------------------------------------------------------------------------------------------ the Hub
@main.command("push")
@click.argument("pack")
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (if it does not exist yet).")
@click.option("--message", default=None, help="Commit message (default: pack name and version).")
@friendly_errors
def push_cmd(pack, repo_id, private, message):
    """Upload PACK to the Hub model repository REPO_ID (user/name) as one commit tagged v<version>."""
    from editpack.hub import push

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
    from editpack.hub import pull

    pack = pull(reference, output, overwrite=overwrite)
    click.echo(f"{pack.name} {pack.version}: {len(pack.facts)} fact(s), verified, at {pack.path}")


@main.command("versions")
@click.argument("repo_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@friendly_errors
def versions_cmd(repo_id, as_json):
    """List the versions of the pack in REPO_ID with their dates and commits."""
    from dataclasses import asdict

    from editpack.hub import versions

    found = versions(repo_id)
    if as_json:
        click.echo(json.dumps([asdict(v) for v in found], indent=2))
        return
    if not found:
        click.echo(f"{repo_id} has no versions yet")
    for v in found:
        click.echo(f"{v.version:<12} {v.tag:<13} {v.date or '-':<26} {v.commit}")


@main.command("show")
@click.argument("pack")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and verification as JSON.")
@friendly_errors
def show_cmd(pack, as_json):
    """Describe a pack: facts, method, base model, files and whether they verify."""
    from pathlib import Path

    from editpack.hub import parse_reference, pull
    from editpack.pack import read_manifest, verify_files

    directory = Path(pack)
    if not directory.exists() and parse_reference(pack):
        directory = pull(pack).path  # from the Hub, through its cache
    manifest = read_manifest(directory)
    problems = verify_files(directory, manifest)
    if as_json:
        click.echo(json.dumps({"manifest": manifest, "verified": not problems, "problems": problems}, indent=2))
        return
    base = manifest["base_model"]
    click.echo(f"{manifest['name']} {manifest['version']}  ({manifest['kind']} pack, created {manifest['created']})")
    click.echo(f"method:  {manifest['method']}")
    click.echo(f"base:    {base['id']} ({base['model_type']})"
               + (f", fingerprint {base['fingerprint'][:23]}…" if base.get("fingerprint") else ""))
    if manifest["kind"] == "memory":
        memory = manifest["memory"]
        click.echo(f"memory:  {memory['n_facts']} facts, scope threshold {memory['threshold']} "
                   f"(route {manifest['hyperparameters'].get('route')}); weights untouched")
    else:
        modules = manifest["delta"]["modules"]
        click.echo("delta:   " + ", ".join(f"{m} (rank {v['rank']}{', dense' if v.get('form') == 'dense' else ''})"
                                           for m, v in modules.items()))
    for parent in manifest.get("parents") or []:
        how = {"onto": "made on top of", "stacked": "stacked from", "extends": "extends"}.get(
            parent.get("relation", "onto"), parent.get("relation"))
        click.echo(f"lineage: {how} {parent['name']}@{parent['version']} ({str(parent.get('content'))[:19]}…)")
    click.echo(f"facts:   {len(manifest['facts'])}")
    for fact in manifest["facts"][:20]:
        old = f"  (was {fact['target_true']})" if fact.get("target_true") else ""
        click.echo(f"  - {fact['prompt'].replace('{}', fact['subject'])} -> {fact['target_new']}{old}")
    if len(manifest["facts"]) > 20:
        click.echo(f"  … {len(manifest['facts']) - 20} more")
    click.echo("files:")
    for name, digest in manifest["files"].items():
        click.echo(f"  {name}  sha256:{digest[:16]}…")
    click.echo("verified: yes" if not problems else "verified: NO\n  " + "\n  ".join(problems))
    if problems:
        raise SystemExit(1)


def protocol_option(func):
    from editpack.evaluate import PROTOCOLS

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
@friendly_errors
def eval_cmd(pack, model_opts, data, limit, protocols, as_json, force):
    """Measure PACK before/after, store the results in its manifest and regenerate its card."""
    from editpack.apply import check_fingerprint
    from editpack.evaluate import PROTOCOLS, evaluate_pack, format_table
    from editpack.facts import load_facts

    (loaded,) = load_packs([pack])
    lm, tokenizer = load_from_options(model_opts, packs_model([loaded]))
    if not force:
        check_fingerprint(lm, loaded)
    facts = load_facts(data, limit=limit, skip_invalid=True) if data else None
    result = evaluate_pack(lm, tokenizer, loaded, facts, data=data, protocols=protocols or PROTOCOLS)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))
    if loaded.source:  # read in place from the Hugging Face cache, which must not be written to
        click.echo(f"results not stored: {pack} is read from the Hugging Face cache; `editpack pull {pack} -o DIR` "
                   "and evaluate DIR to store them in the pack", err=True)
        return
    loaded.evaluation = result
    loaded.save(loaded.path, overwrite=True)
    if not as_json:
        click.echo(f"results written to {loaded.path / 'editpack.json'} and its card README.md")


@main.command("bench")
@model_options
@click.option("--method", default="rome", show_default=True)
@click.option("--data", required=True, metavar="[FORMAT:]PATH", help="Facts to edit one at a time.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--corpus", default=None, envvar="EDITPACK_CORPUS", metavar="PATH", help="Key-statistics corpus.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Method hyper-parameters.")
@protocol_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON here.")
@friendly_errors
def bench_cmd(model_opts, method, data, limit, corpus, settings, protocols, as_json, out):
    """Edit each record on its own (model restored between) and report all protocols, time and memory."""
    from editpack._io import atomic_write_json
    from editpack.api import edit
    from editpack.evaluate import PROTOCOLS, bench_edits, format_table
    from editpack.facts import load_facts
    from editpack.methods import get_method

    get_method(method)
    hparams = parse_set(settings)
    if corpus:
        hparams["stats_corpus"] = corpus
    facts = load_facts(data, limit=limit, skip_invalid=True)
    lm, tokenizer = load_from_options(model_opts)
    result = bench_edits(lm, tokenizer, facts, lambda fact: edit(lm, fact, method, tokenizer=tokenizer, **hparams),
                         protocols=protocols or PROTOCOLS)
    result.update({"method": method, "model": lm.editpack_ref.id, "data": data, "hyperparameters": hparams})
    if out:
        atomic_write_json(out, result)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(format_table(result))
        click.echo(f"seconds per edit: {result['seconds_per_edit']['mean']}  peak RSS: {result['peak_rss_mib']} MiB")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
