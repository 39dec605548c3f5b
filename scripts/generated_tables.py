"""The README's generated tables: "choosing a method" from the benchmarks' JSON (``bench/results``) and the
commands from the click commands themselves; never typed by hand.

    python3 scripts/generated_tables.py            # rewrite them in README.md (and docs/results/methods.md)
    python3 scripts/generated_tables.py --check    # exit 1 when a page is not what the sources give (a test runs this)

``docs/results/choosing.json`` lists the situations, one row each: the situation and what the method costs in
words (no figures), the method, and the JSON the figures come from (``bench/results/methods/<method>.json`` from
``python3 -m bench.methods``, or ``bench/results/lifelong-….json#<method>`` from ``python3 -m bench.lifelong``).
The table is written between the ``<!-- methods-table -->`` and ``<!-- /methods-table -->`` lines of each page,
the commands between ``<!-- commands-table -->`` and ``<!-- /commands-table -->``; ``docs/results/models.md``'s
table (every model of ``bench/results/models/``) between ``<!-- models-table -->`` and ``<!-- /models-table -->``;
``docs/concepts/architectures.md``'s table of families (every file of ``adapters/``: what edits it, what it exports
to) between ``<!-- families-table -->`` and ``<!-- /families-table -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "docs" / "results" / "choosing.json"
ADAPTERS = REPO / "adapters"
#: ``bench/results/models/<model>/<method>.json`` (``python3 -m bench.methods --out-dir …``): the models page's table.
MODELS = REPO / "bench" / "results" / "models"
MODEL_ORDER = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b")


def figures(source: str) -> dict:
    """prob_compare efficacy / paraphrase / neighbourhood after the edits (and the neighbourhood before),
    generate_match's share of neighbourhood answers unchanged, seconds per edit, records and date."""
    path, _, method = source.partition("#")
    data = json.loads((REPO / path).read_text(encoding="utf-8"))
    if method:  # a lifelong run: the method's last round
        run = data["methods"][method]
        last = run["rounds"][-1]
        pc, gm = last["scores"]["prob_compare"], last["scores"]["generate_match"]
        return {"efficacy": pc["efficacy"]["after"], "paraphrase": pc["paraphrase"]["after"],
                "neighbourhood": pc["neighbourhood"]["after"], "unedited": pc["neighbourhood"]["before"],
                "kept": gm["neighbourhood"]["after"], "seconds": run["seconds_per_edit"],
                "n": f"{last['edits']} edits in rounds of {data['round_size']}", "model": data["model"]}
    pc, gm = data["protocols"]["prob_compare"], data["protocols"]["generate_match"]
    return {"efficacy": pc["reliability"]["after"], "paraphrase": pc["generalization"]["after"],
            "neighbourhood": pc["locality"]["after"], "unedited": pc["locality"]["before"],
            "kept": gm["locality"]["after"], "seconds": data["seconds_per_edit"]["mean"],
            "n": f"{data['n']} records, {'one at a time' if data['mode'] == 'each' else 'in one edit'}",
            "model": data["model"]}


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}"


def table(link: str) -> str:
    rows = json.loads(SPEC.read_text(encoding="utf-8"))
    lines = ["| situation | method | what it costs | efficacy / paraphrase / neighbourhood (unedited) | "
             "neighbours' answers kept | s/edit |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        f = figures(row["source"])
        method = f"`{row['method']}`" + (" (experimental)" if row.get("experimental") else "")
        lines.append(f"| {row['situation']} | {method} | {row['cost']} | {pct(f['efficacy'])} / "
                     f"{pct(f['paraphrase'])} / {pct(f['neighbourhood'])} ({pct(f['unedited'])}) | {pct(f['kept'])} % | "
                     f"{f['seconds']:.2f} |")
    models = sorted({figures(r["source"])["model"] for r in rows})
    lines += ["", f"Measured on {', '.join(models)} with 2 CPU cores, CounterFact's `counterfact-edit.json` "
              "(prob_compare; neighbours' answers kept: generate_match on the neighbourhood prompts); each row's "
              f"records, command and date are in [the results]({link})."]
    return "\n".join(lines)


def models_table() -> str:
    """One row per model and method: the three protocols' efficacy / paraphrase / neighbourhood after the edits
    (neighbourhood before in brackets), seconds per edit and the process's peak memory."""
    lines = ["| model | method | records | prob_compare | teacher_forced_token_acc | generate_match | s/edit | "
             "peak RSS |", "|---|---|---|---|---|---|---|---|"]
    folders = sorted((d for d in MODELS.iterdir() if d.is_dir()),
                     key=lambda d: (MODEL_ORDER.index(d.name) if d.name in MODEL_ORDER else len(MODEL_ORDER), d.name))
    for folder in folders:
        for method in ("rome", "memit", "grace"):
            path = folder / f"{method}.json"
            if not path.is_file():
                continue
            data = json.loads(path.read_text(encoding="utf-8"))
            cells = []
            for protocol in ("prob_compare", "teacher_forced_token_acc", "generate_match"):
                m = data["protocols"][protocol]
                cells.append(f"{pct(m['reliability']['after'])} / {pct(m['generalization']['after'])} / "
                             f"{pct(m['locality']['after'])} ({pct(m['locality']['before'])})")
            mode = "one at a time" if data["mode"] == "each" else "in one edit"
            lines.append(f"| {data['model']} | `{method}` | {data['n']}, {mode} | {' | '.join(cells)} | "
                         f"{data['seconds_per_edit']['mean']:.2f} | {data['peak_rss_mib'] / 1024:.1f} GiB |")
    return "\n".join(lines)


def families_table() -> str:
    """One row per architecture file: its model types, the methods the family table's test edits it with, whether
    the pack loads in plain PEFT, and where it exports (engines' LoRA folders, llama.cpp GGUF, merged weights)."""
    lines = ["| file | model types | edited by (tested on a tiny model) | plain PEFT load | exports |",
             "|---|---|---|---|---|"]
    for path in sorted(ADAPTERS.glob("*.json")):
        spec = json.loads(path.read_text(encoding="utf-8"))
        types = ", ".join(f"`{t}`" for t in spec["model_types"])
        if spec.get("experts"):
            edited = ("ROME, MEMIT, GRACE, a memory pack; AlphaEdit in `test_moe.py` (each expert on its own; the "
                      "router untouched); other methods refused")
            peft = "yes (LoRA on the stacked `down_proj`, `target_parameters`)"
            exports = "merged weights (the engine rules describe LoRA on layers only)"
        else:
            edited, peft = "ROME, MEMIT, GRACE, a memory pack (other methods take the same layout)", "yes"
            exports = ("merged weights (Conv1D layers: no engine LoRA)" if spec.get("mlp_transposed") else
                       "engine LoRA (vLLM, SGLang, TGI, LoRAX), " + ("GGUF LoRA, " if spec.get("gguf") else "")
                       + "merged weights")
        lines.append(f"| `{path.stem}` | {types} | {edited} | {peft} | {exports} |")
    return "\n".join(lines)


def commands() -> str:
    """Every ``editpack`` command with its one-line help, from the click group."""
    from editpack.cli.main import main as group

    lines = ["| command | what it does |", "|---|---|"]
    for name in sorted(group.commands):
        lines.append(f"| `editpack {name}` | {group.commands[name].get_short_help_str(120)} |")
    return "\n".join(lines)


#: Each generated page, and its blocks with what fills them.
PAGES = {
    REPO / "README.md": {"methods-table": lambda: table("docs/results/methods.md"), "commands-table": commands},
    REPO / "docs" / "results" / "methods.md": {"methods-table": lambda: table("methods.md")},
    REPO / "docs" / "results" / "models.md": {"models-table": models_table},
    REPO / "docs" / "concepts" / "architectures.md": {"families-table": families_table},
}


def fill(text: str, block: str, body: str, page: Path) -> str:
    start, end = f"<!-- {block} -->", f"<!-- /{block} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} … {end} block")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def rendered(page: Path, blocks: dict) -> str:
    text = page.read_text(encoding="utf-8")
    for block, render in blocks.items():
        text = fill(text, block, render(), page)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for page, blocks in PAGES.items():
        new = rendered(page, blocks)
        if new != page.read_text(encoding="utf-8"):
            stale.append(page.relative_to(REPO))
            if not args.check:
                page.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"not generated from bench/results: {', '.join(map(str, stale))} (run python3 scripts/generated_tables.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
