"""Lifelong editing: many CounterFact edits in rounds, every round a pack version, scored on everything so far.

    python3 -m bench.lifelong [--n 1000] [--round-size 100] [--methods grace,ultraedit,wise,alphaedit] [--score-at N,…]
                             [--set METHOD:KEY=VALUE ...] [--versions DIR] [--plot docs/results/lifelong.png]
                             [--table FILE] [--resume]
    python3 -m bench.lifelong --report --out RUN.json [--table FILE] [--plot FILE]

For each method, the first ``--n`` records are edited ``--round-size`` at a time: round 1 with ``editpack.edit``,
every later round with ``editpack.extend`` (one new version per round, computed on the model with the earlier
rounds applied). After every round the newest version is applied and scored on every fact edited so far, with
their paraphrase and neighbourhood prompts, under ``prob_compare`` and ``generate_match`` (efficacy =
reliability, paraphrase = generalization, neighbourhood = locality; the unedited model's scores are measured once,
in the same run). Each round records its seconds per edit and the version's size on disk.

The JSON (``--out``, rewritten after every round so a long run keeps what it has) holds one row per round and
method; ``--plot`` draws efficacy, paraphrase and neighbourhood against the number of edits, one line per method
(solid: prob_compare, dashed: generate_match), and the Markdown tables (printed, and written to ``--table``)
hold each method after its last round beside the unedited model, then every round; ``--report`` writes both
from a recorded run without running anything. ``--versions DIR`` keeps every version's pack directory there
(``DIR/<method>/<method>-lifelong-<version>``), for ``editpack log`` and ``editpack diff``.

``--resume`` continues a run that was cut short (its ``--out`` and ``--versions`` as before, the same settings):
methods already finished are kept, and a method cut short goes on from its last recorded version, loaded from
``--versions`` (a version saved after the last recorded round is set aside and made again; a method whose last
recorded version is no longer there, as in a fresh checkout, starts again from its first round). The unedited model's
scores are measured again (the same numbers: nothing in them is random); ``seconds_total`` adds up the sessions
and ``commits`` lists the checkout's commit in each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


import editpack  # noqa: E402
import editpack.console  # noqa: E402
from editpack._io import atomic_file, atomic_write_text  # noqa: E402
from editpack.evaluation.protocols import Probes, combine, measure  # noqa: E402
from editpack.methods.base import parse_settings  # noqa: E402

from bench._common import DATA, REPO, checkpoint  # noqa: E402

PROTOCOLS = ("prob_compare", "generate_match")
SHOWN = {"reliability": "efficacy", "generalization": "paraphrase", "locality": "neighbourhood"}
STATS_METHODS = ("rome", "memit", "alphaedit")  # methods that take a key-statistics corpus


def first(probes: Probes, k: int) -> Probes:
    """The probes of the first ``k`` facts (every field of :class:`Probes` is a per-fact list)."""
    return Probes(*(getattr(probes, f.name)[:k] for f in dataclasses.fields(Probes)))


def scores(result: dict) -> dict:
    return {protocol: {SHOWN[m]: {"before": row["before"], "after": row["after"], "n": row["n"]}
                       for m, row in result["protocols"][protocol].items() if m in SHOWN}
            for protocol in PROTOCOLS}


def source_commit() -> str | None:
    """The checkout's commit, so that a run resumed across sessions shows what code each part ran."""
    try:
        found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return found.stdout.strip() or None


def version_folder(folder: Path, method: str, version: str) -> Path:
    """Where a method's version is kept (``--versions``): its pack is named ``<method>-lifelong``."""
    return folder / f"{method}-lifelong-{version}"


def size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _cell(scored: dict, side: str = "after") -> str:
    values = [scored[m][side] for m in SHOWN.values()]
    return " / ".join("–" if v is None else f"{100 * v:.1f}" for v in values)


def table(result: dict) -> str:
    """Markdown: each method after its last scored round (seconds per edit over the run, the last version's size),
    the unedited model on the same facts, then every scored round of every method, one table per protocol."""
    lines = ["| method | edits | s/edit | pack size | " + " | ".join(f"{p} efficacy / paraphrase / neighbourhood"
                                                                  for p in PROTOCOLS) + " |",
             "|---|---|---|---|" + "---|" * len(PROTOCOLS)]
    last = {m: r for m, e in result["methods"].items() for r in e["rounds"] if "scores" in r}  # the last scored
    for method, row in last.items():
        done = sum(r["seconds"] for r in result["methods"][method]["rounds"] if r["edits"] <= row["edits"])
        lines.append(f"| {method} | {row['edits']} | {done / row['edits']:.2f} | {row['pack_bytes'] / 1e6:.1f} MB | "
                     + " | ".join(_cell(row["scores"][p]) for p in PROTOCOLS) + " |")
    if last:
        widest = max(last.values(), key=lambda r: r["edits"])
        lines.append(f"| unedited model | {widest['edits']} | – | – | "
                     + " | ".join(_cell(widest["scores"][p], "before") for p in PROTOCOLS) + " |")
    methods = list(last)
    for protocol in PROTOCOLS:
        lines += ["", f"{protocol}, efficacy / paraphrase / neighbourhood (%) after each round:", "",
                  "| edits | unedited | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
        by_edits: dict[int, dict[str, dict]] = {}
        for method in methods:
            for r in result["methods"][method]["rounds"]:
                if "scores" in r:
                    by_edits.setdefault(r["edits"], {})[method] = r["scores"][protocol]
        for edits, found in sorted(by_edits.items()):
            before = _cell(next(iter(found.values())), "before")
            lines.append(f"| {edits} | {before} | " + " | ".join(_cell(found[m]) if m in found else ""
                                                                for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4), dpi=110)
    axes = fig.subplots(1, 3, sharey=True)
    colors = ["#2f6fde", "#d9534f", "#2ca02c", "#9467bd", "#ff7f0e"]
    for (method, entry), color in zip(result["methods"].items(), colors):
        rounds = [r for r in entry["rounds"] if "scores" in r]
        xs = [r["edits"] for r in rounds]
        for ax, metric in zip(axes, SHOWN.values()):
            for protocol, style in zip(PROTOCOLS, ("-", "--")):
                ys = [100 * (r["scores"][protocol][metric]["after"] or 0) for r in rounds]
                ax.plot(xs, ys, style, color=color, marker="o", markersize=3,
                        label=f"{method} ({protocol})" if metric == "efficacy" else None)
    for ax, metric in zip(axes, SHOWN.values()):
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("edits", fontsize=9)
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].set_ylabel("% (after)", fontsize=9)
    fig.legend(loc="lower center", ncol=min(6, 2 * len(result["methods"])), fontsize=7, frameon=False)
    fig.suptitle(f"Lifelong editing on {result['model']}: {result['n']} CounterFact edits in rounds of "
                 f"{result['round_size']} (solid: prob_compare, dashed: generate_match)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})


def recorded_settings(hparams: dict) -> dict:
    """A method's settings as the run's JSON records them: the statistics corpus by its file name, not by this
    machine's path (the JSON is shared; a resumed run compares settings in this form)."""
    return {k: Path(v).name if k == "stats_corpus" else v for k, v in hparams.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--round-size", type=int, default=100)
    parser.add_argument("--methods", default="grace,ultraedit,wise,alphaedit")
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--corpus", default=str(DATA / "corpus" / "wikipedia_en_sample.jsonl"),
                        help="Key-statistics corpus for the methods that use one (when the file exists).")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="A hyper-parameter for one method (repeatable).")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "lifelong.json"))
    parser.add_argument("--plot", default=None, help="Write the PNG plot here.")
    parser.add_argument("--versions", default=None, help="Keep every version's pack directory under this folder.")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run recorded in --out, whose versions are kept in --versions.")
    parser.add_argument("--table", default=None, help="Write the Markdown tables here (they are printed as well).")
    parser.add_argument("--report", action="store_true",
                        help="Run nothing: write --table and --plot from the run recorded in --out.")
    parser.add_argument("--score-at", default=None, metavar="N,N,…",
                        help="Score only after the rounds that reach these edit counts (default: after every round; "
                             "the last round is always scored). Scoring all facts so far is most of a long run.")
    args = parser.parse_args(argv)
    editpack.console.configure()  # the libraries' warnings, as a normal command hides them
    if args.report:
        if not Path(args.out).is_file():
            parser.error(f"--report: {args.out} does not exist")
        return report(json.loads(Path(args.out).read_text(encoding="utf-8")), args)

    settings: dict[str, dict] = {}
    for item in args.settings:
        method, sep, rest = item.partition(":")
        if not sep:
            parser.error(f"--set {item!r} is not METHOD:KEY=VALUE")
        settings.setdefault(method, {}).update(parse_settings([rest]))
    methods = args.methods.split(",")
    score_at = {int(n) for n in args.score_at.split(",")} if args.score_at else None
    for method in methods:
        editpack.methods.get_method(method)  # unknown names fail before any work
    if args.resume and not args.versions:
        parser.error("--resume needs --versions, the folder where the run kept its versions")
    if args.resume and not Path(args.out).is_file():
        parser.error(f"--resume: {args.out} does not exist; start the run without --resume")
    previous = json.loads(Path(args.out).read_text(encoding="utf-8")) if args.resume else None

    model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=args.n, skip_invalid=True)
    corpus = {"stats_corpus": args.corpus} if Path(args.corpus).is_file() else {}

    def method_settings(method: str) -> dict:
        return {**(corpus if method in STATS_METHODS else {}), **settings.get(method, {})}

    commit = source_commit()
    result: dict = {"benchmark": "lifelong", "model": model.editpack_ref.id, "data": Path(args.data).name,
                    "n": len(facts), "round_size": args.round_size, "protocols": list(PROTOCOLS),
                    "torch": __import__("torch").__version__, "methods": {}}

    if previous is not None:
        same = {k: previous.get(k) for k in ("model", "data", "n", "round_size")}
        if same != {k: result[k] for k in same}:
            parser.error(f"--resume: {args.out} records another run ({same}); start a new one without --resume")
        for method, entry in previous.get("methods", {}).items():
            now = recorded_settings(method_settings(method))
            if method in methods and recorded_settings(entry["hyperparameters"]) != now:
                parser.error(f"--resume: {method} ran with {entry['hyperparameters']}, not {now}")
        result["methods"] = {m: previous["methods"][m] for m in methods if m in previous.get("methods", {})}
        result["seconds_earlier_sessions"] = previous.get("seconds_total", previous.get("seconds_so_far", 0.0))
        result["commits"] = previous.get("commits", [])
        if result["commits"] and result["commits"][-1] != commit:
            print(f"note: resuming at commit {commit}; the run so far ran {result['commits']}", flush=True)
    result["commits"] = result.get("commits", []) + [commit]

    def save() -> None:
        result["seconds_so_far"] = round(result.get("seconds_earlier_sessions", 0.0) + time.perf_counter() - start, 1)
        checkpoint(result, args.out)

    start = time.perf_counter()
    base = measure(model, tokenizer, facts, fluency_tokens=0)
    result["seconds_measure_base"] = round(time.perf_counter() - start, 1)
    keep = Path(args.versions) if args.versions else Path(tempfile.mkdtemp(prefix="editpack-lifelong-"))
    try:
        for method in methods:
            hparams = method_settings(method)
            folder = keep / method
            entry = result["methods"].get(method)
            if entry is not None and "seconds_per_edit" in entry:
                continue  # finished in an earlier session
            pack, edited_so_far = None, 0
            if entry is not None and entry["rounds"]:
                latest = version_folder(folder, method, entry["rounds"][-1]["version"])
                if not latest.is_dir():  # e.g. a fresh checkout: the recorded rounds are made (and scored) again
                    print(f"{method}: {folder} does not hold version {entry['rounds'][-1]['version']}; "
                          f"starting {method} again", flush=True)
                    entry = None
            if entry is None or not entry["rounds"]:
                if folder.exists():
                    shutil.rmtree(folder)
                entry = {"hyperparameters": recorded_settings(hparams), "rounds": []}
                result["methods"][method] = entry
            else:
                last = entry["rounds"][-1]
                recorded = {version_folder(folder, method, r["version"]) for r in entry["rounds"]}
                for stale in (p for p in folder.iterdir() if p not in recorded):
                    shutil.rmtree(stale)  # saved after the last recorded round: made again below
                pack, edited_so_far = editpack.load_pack(latest), last["edits"]
                print(f"{method}: resuming after {edited_so_far} edits (version {pack.version})", flush=True)
            for r in range(edited_so_far, len(facts), args.round_size):
                chunk = facts[r : r + args.round_size]
                t0 = time.perf_counter()
                pack = (editpack.edit(model, chunk, method, name=f"{method}-lifelong", **hparams) if pack is None
                        else editpack.extend(model, pack, chunk))
                seconds = time.perf_counter() - t0
                edited_so_far += len(chunk)
                path = pack.save(version_folder(folder, method, pack.version))
                row = {"edits": edited_so_far, "version": pack.version, "seconds": round(seconds, 2),
                       "seconds_per_edit": round(seconds / len(chunk), 3), "pack_bytes": size_on_disk(path),
                       "parts": pack.parts() if len(pack.parts()) <= 8 else len(pack.parts())}
                entry["rounds"].append(row)
                if score_at is not None and edited_so_far not in score_at and edited_so_far < len(facts):
                    print(f"{method} {edited_so_far:>5} edits: {row['seconds_per_edit']} s/edit", flush=True)
                    save()
                    continue
                edited = editpack.apply(model, pack)
                t1 = time.perf_counter()
                try:
                    probes = measure(edited, tokenizer, facts[:edited_so_far], fluency_tokens=0)
                finally:
                    model = editpack.revert(edited)
                scored = combine(facts[:edited_so_far], first(base, edited_so_far), probes, PROTOCOLS)
                row.update(seconds_scoring=round(time.perf_counter() - t1, 1), scores=scores(scored))
                pc = row["scores"]["prob_compare"]
                print(f"{method} {edited_so_far:>5} edits: {row['seconds_per_edit']} s/edit; prob_compare "
                      + " ".join(f"{k} {v['after']:.3f}" for k, v in pc.items()), flush=True)
                save()
            entry["seconds_per_edit"] = round(sum(r["seconds"] for r in entry["rounds"]) / len(facts), 3)
            save()
    finally:
        if not args.versions:
            shutil.rmtree(keep, ignore_errors=True)
    save()
    result["seconds_total"] = result.pop("seconds_so_far")
    checkpoint(result, args.out)
    return report(result, args)


def report(result: dict, args: argparse.Namespace) -> dict:
    text = table(result)
    print(text, end="", flush=True)
    if args.table:
        atomic_write_text(args.table, text)
    if args.plot:
        plot(result, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
