"""What every command shares: one-line errors, the output lock and checks, the model options, parsing of
``--set``/``--layers``/``--corpus``, and the lines a new pack is reported with. Rules live in the library; this
turns their errors into click's."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
from pathlib import Path

import click
from filelock import FileLock, Timeout

from editpack.api import base_model_name, check_destination, method_config
from editpack.errors import EditpackError
from editpack.evaluation.protocols import PROTOCOLS, starts_with
from editpack.evaluation.report import evaluate_pack
from editpack.methods.base import parse_settings
from editpack.model.arch import load_spec_file
from editpack.model.loading import DTYPE_CHOICES, check_placement, load_model
from editpack.model.stats import check_corpus_file
from editpack.paths import cache_dir
from editpack.share.hub import resolve_pack


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``with`` block (atomic writes, locks) cleans up."""


def terminate(signum, frame):  # pragma: no cover - exercised by a subprocess test
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
    """Before any work: :func:`editpack.api.check_destination`, as a usage error."""
    try:
        check_destination(output, overwrite=overwrite, inputs=inputs, model=model)
    except (FileExistsError, EditpackError) as exc:
        raise click.UsageError(str(exc).replace("overwrite=True / --overwrite", "--overwrite")) from None


MODEL_KEYS = ("model", "dtype", "device_map", "load_in_4bit", "load_in_8bit", "max_memory", "offload_folder", "arch")


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
        click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPE_CHOICES),
                     help="Precision the model is loaded in."),
        click.option("--device-map", default=None, help="accelerate device map, e.g. auto, cpu or sequential."),
        click.option("--max-memory", multiple=True, default=(), metavar="DEVICE=SIZE",
                     help="With --device-map: memory budget per device, e.g. cpu=2GiB (repeatable)."),
        click.option("--offload-folder", default=None, type=click.Path(file_okay=False),
                     help="With --device-map: where layers that fit nowhere are offloaded to disk."),
        click.option("--load-in-4bit", is_flag=True, default=False,
                     help="Quantize to 4 bits with bitsandbytes (packs stay unmerged)."),
        click.option("--arch", default=None, metavar="FILE", type=click.Path(dir_okay=False),
                     help="An architecture file for this model (`editpack arch` prints one) instead of its family's."),
        click.option("--load-in-8bit", is_flag=True, default=False,
                     help="Quantize to 8 bits with bitsandbytes (packs stay unmerged)."),
    ]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        opts = {key: kwargs.pop(key) for key in MODEL_KEYS}
        opts["max_memory"] = parse_max_memory(opts["max_memory"])
        if opts["arch"]:
            try:
                opts["arch"] = load_spec_file(opts["arch"])  # before the model loads
            except EditpackError as exc:
                raise click.BadParameter(str(exc), param_hint="--arch") from None
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
    return click.option("--no-eval", "no_eval", is_flag=True, default=False,
                        help="Skip the evaluation at creation (the card then says it was not evaluated).")(func)


def protocol_option(func):
    return click.option("--protocol", "protocols", multiple=True, default=(), type=click.Choice(PROTOCOLS),
                        help="Protocol(s) to report (default: all three).")(func)


def load_from_options(opts: dict, packs=()):
    """Load the model ``opts`` names, or (when --model is not given) the base model the first of ``packs`` records."""
    options = dict(opts)
    try:
        name = options.pop("model") or base_model_name(list(packs))
    except EditpackError as exc:
        raise click.UsageError(str(exc)) from None
    return load_model(name, **options)


def load_packs(references) -> list:
    """Packs from directories or ``user/name@version`` Hub references."""
    return [resolve_pack(r) for r in references]


def parse_set(values: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs; values are JSON when they parse as JSON, else strings."""
    try:
        return parse_settings(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


def check_settings(method: str, hyperparameters: dict, hint: str | None = "--set") -> None:
    """The method's hyper-parameters, types and ranges checked before the model loads (a usage error)."""
    try:
        method_config(method, **hyperparameters)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of layer indices like 4,5,6",
                                 param_hint="--layers") from None
    if any(layer < 0 for layer in layers):
        raise click.BadParameter(f"layer indices must be 0 or more, not {text!r}", param_hint="--layers")
    return layers


def check_corpus(path: str) -> str:
    try:
        return str(check_corpus_file(path).resolve())
    except EditpackError as exc:
        raise click.BadParameter(str(exc).removeprefix("corpus "), param_hint="--corpus") from None


def evaluate_new(lm, tokenizer, pack) -> None:
    """Evaluate a new pack before it is saved (its card then carries the results); say how long it took."""
    pack.evaluation = evaluate_pack(lm, tokenizer, pack)
    side = pack.evaluation.get("side_effects") or {}
    click.echo(f"evaluated in {pack.evaluation['seconds']:.1f} s: {side.get('verdict', 'no side effects measured')}")


def warn_unreached(facts, rows) -> None:
    """Say so when the edited model's greedy answer does not start with the new target."""
    missed = [(f, r) for f, r in zip(facts, rows) if not starts_with(r.after, f.target_new)]
    if missed:
        named = "; ".join(f"{f.text!r} -> {r.after.strip()!r} (wanted {f.target_new!r})" for f, r in missed[:3])
        click.echo(f"Warning: {len(missed)} of {len(facts)} checked fact(s) do not start with their new target in "
                   f"greedy generation: {named}. `editpack eval` measures the edit with every protocol.", err=True)
