"""editpack at 7B scale on a GPU: ROME, batched MEMIT and AlphaEdit, key statistics, each beside its floor.

    python3 -m bench.gpu_scale [--shape llama2-7b|llama3-8b|qwen2.5-7b] [--tokenizer DIR] [--facts 100,1000]
                              [--methods memit,alphaedit] [--rome-edits 10] [--stats-tokens 1000000] [--out FILE]
    python3 -m bench.gpu_scale --small          # a tiny shape on the CPU, the same code path (a test runs it)

Builds a model of the named shape with random bfloat16 weights on the GPU (timing only: the facts mean nothing to
it) and runs editpack's own code, with the floors measured in the same process:

- key statistics for ``--stats-tokens`` corpus tokens (the shipped Wikipedia slice, cycled) at every layer ROME
  and MEMIT need, in one pass, against a plain forward of the same batches to the deepest of those layers;
- ROME: ``--rome-edits`` edits after a warm-up (statistics cached), each beside the bare δ loop of
  ``bench/_common.py`` with the same prompts and Adam steps;
- MEMIT and AlphaEdit with each ``--facts`` count in one batch (statistics cached), beside the bare δ loop over
  the same facts in the same chunks (measured on the first chunk, times the number of chunks).

Prints one JSON object: seconds per edit or per fact, tokens per second, peak GiB, pack bytes, each with its floor
and the ratio. ``EDITPACK_HOME`` is a temporary folder for the run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import (  # noqa: E402
    REPO,
    StepCounter,
    delta_loop_floor,
    emit,
    forward_floor,
    in_dtype,
    private_home,
    synchronize,
    timed,
)

#: Shapes as data: a transformers config per name (random weights; vocabulary at least the tokenizer's).
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=8192),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=32768),
    "small": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}

SUBJECTS = ("Alder Quay", "Brindle Fen", "Corvin Hall", "Dunmore Reach", "Elsby Cross", "Farrow Mills",
            "Galen Ward", "Hollin Gate", "Ivel Bank", "Jessop Row")
RELATIONS = (("{} is located in the country of", ("Norway", "Chile", "Kenya", "Japan", "Peru")),
             ("{} was founded by", ("Ada Lovelace", "Nikola Tesla", "Marie Curie", "Alan Turing")),
             ("The official language of {} is", ("Finnish", "Basque", "Tagalog", "Welsh")))


def synthetic_facts(n: int):
    """``n`` facts with distinct subjects (a random model knows nothing; only the shapes of the prompts count)."""
    import editpack

    facts = []
    for i, (a, b) in enumerate(itertools.islice(itertools.product(SUBJECTS, repeat=2), n)):
        prompt, targets = RELATIONS[i % len(RELATIONS)]
        subject = f"{a.split()[0]} {b.split()[1]} {i}"
        facts.append(editpack.make_fact(prompt, subject, targets[i % len(targets)], targets[(i + 1) % len(targets)]))
    if len(facts) < n:
        raise ValueError(f"at most {len(facts)} synthetic facts")
    return facts


def build(shape: str, tokenizer, device: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(SHAPES[shape])
    model_type = values.pop("model_type")
    values["vocab_size"] = max(values["vocab_size"], len(tokenizer))
    config = AutoConfig.for_model(model_type, **values, tie_word_embeddings=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.editpack_tokenizer = tokenizer
    return model, values["vocab_size"]


def cycled_corpus(source: Path, tokenizer, tokens: int, folder: Path) -> Path:
    """A JSONL corpus of at least ``tokens`` tokens: ``source`` repeated as often as needed."""
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    have = sum(len(tokenizer(json.loads(line)["text"])["input_ids"]) for line in lines)
    out = folder / "corpus.jsonl"
    out.write_text("\n".join(lines * max(1, -(-tokens // have))) + "\n", encoding="utf-8")
    return out


class Peak:
    """Peak memory of what runs inside: GPU memory allocated (GiB) on CUDA, else the process's peak RSS."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.gib = 0.0

    def __enter__(self) -> "Peak":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pack_bytes(pack) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = pack.save(Path(folder) / "pack")
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b", choices=[s for s in SHAPES if s != "small"])
    parser.add_argument("--tokenizer", default=None, help="A tokenizer folder (default: the built-in model's).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rome-edits", type=int, default=10)
    parser.add_argument("--facts", default="100,1000")
    parser.add_argument("--methods", default="memit,alphaedit")
    parser.add_argument("--stats-tokens", type=int, default=1_000_000)
    parser.add_argument("--small", action="store_true", help="a tiny shape on the CPU, few facts and tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.small:
        args.shape, args.device, args.rome_edits, args.facts, args.stats_tokens = "small", "cpu", 1, "4", 4000
    from editpack.model.loading import resolve_model

    tokenizer_folder = args.tokenizer or resolve_model(None).path  # before the private cache: the built-in's folder
    with private_home() as home:
        return emit(run(args, tokenizer_folder, Path(home)), args.out)


def run(args, tokenizer_folder: str, home: Path) -> dict:
    import editpack
    from editpack.model import stats
    from editpack.packs.statistics import cached_moments
    from editpack.model.arch import spec_for
    from editpack.methods.locate.values import rewrite_lookups
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    model, vocab = build(args.shape, tokenizer, args.device)
    spec = spec_for(model)
    rome_layer = spec.role_layers("critical", model)[0]  # the layers ROME and MEMIT edit by default
    run_layers = spec.role_layers("run", model)
    needed = sorted({rome_layer, *run_layers})
    corpus = cycled_corpus(REPO / "tests" / "data" / "wikipedia-slice.jsonl", tokenizer, args.stats_tokens, home)
    stats_config = stats.StatsConfig(corpus=str(corpus), n_tokens=args.stats_tokens)
    common = {"stats_corpus": str(corpus), "stats_tokens": args.stats_tokens}
    result: dict = {
        "benchmark": "gpu_scale", "shape": args.shape, "config": {**SHAPES[args.shape], "vocab_size": vocab},
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": "bfloat16",
    }

    # Key statistics: every needed layer in one pass, against a forward to the deepest.
    with Peak(args.device) as peak:
        (_, count, _), seconds = timed(lambda: stats.compute_second_moments(model, tokenizer, spec, needed, stats_config))
        synchronize(args.device)
    floor_seconds, floor_tokens = forward_floor(model, tokenizer, spec, max(needed), stats_config)
    cached_moments(model, tokenizer, spec, needed, stats_config)  # cached for the edits below (not timed)
    result["key_statistics"] = {
        "layers": needed, "tokens": count, "seconds": round(seconds, 2), "tokens_per_second": round(count / seconds),
        "floor_tokens_per_second": round(floor_tokens / floor_seconds),
        "ratio_to_floor": round((count / seconds) / (floor_tokens / floor_seconds), 3), "peak_gib": round(peak.gib, 2),
        "floor": f"plain forward of the same batches through block {max(needed)}",
    }
    print(json.dumps({"key_statistics": result["key_statistics"]}), flush=True)

    # ROME: one warm-up edit, then edits one at a time.
    facts = synthetic_facts(max(args.rome_edits + 1, *(int(n) for n in args.facts.split(","))))
    warm = editpack.edit(model, facts[-1], "rome", tokenizer=tokenizer, **common)
    floor_model = in_dtype(model, warm.hyperparameters["optimize_dtype"])
    module = spec.mlp_out_name(rome_layer)
    seconds, floors = [], []
    with Peak(args.device) as peak:
        for fact in facts[: args.rome_edits]:
            with StepCounter() as counter:
                pack, took = timed(lambda: editpack.edit(model, fact, "rome", tokenizer=tokenizer, **common))
            seconds.append(took)
            prompts = rewrite_lookups(tokenizer, fact, pack.hyperparameters["context_templates"])
            floors.append(delta_loop_floor(floor_model, tokenizer, module, [prompts], counter.steps[0]))
    result["rome"] = {
        "edits": len(seconds), "layer": rome_layer, "seconds_per_edit_median": round(statistics.median(seconds), 3),
        "seconds_per_edit_mean": round(statistics.mean(seconds), 3),
        "floor_seconds_median": round(statistics.median(floors), 3),
        "ratio_to_floor": round(statistics.median(seconds) / statistics.median(floors), 3),
        "peak_gib": round(peak.gib, 2), "pack_bytes": pack_bytes(pack),
        "floor": "bare δ loop: same prompts and Adam steps, NLL only, whole prompts each step",
    }
    print(json.dumps({"rome": result["rome"]}), flush=True)

    # MEMIT and AlphaEdit: n facts in one batch.
    run_module = spec.block_name(max(run_layers))
    for method in args.methods.split(","):
        for n in (int(x) for x in args.facts.split(",")):
            batch = facts[:n]
            with Peak(args.device) as peak, StepCounter() as counter:
                pack, took = timed(lambda: editpack.edit(model, batch, method, tokenizer=tokenizer, **common))
            chunk = pack.hyperparameters["facts_per_batch"]
            first = [rewrite_lookups(tokenizer, f, pack.hyperparameters["context_templates"]) for f in batch[:chunk]]
            floor = delta_loop_floor(floor_model, tokenizer, run_module, first, max(counter.steps)) * (-(-n // chunk))
            result[f"{method}_{n}"] = {
                "facts": n, "layers": run_layers, "facts_per_batch": chunk, "seconds": round(took, 2),
                "seconds_per_fact": round(took / n, 3), "delta_loop_seconds": round(counter.seconds, 2),
                "floor_seconds": round(floor, 2), "ratio_to_floor": round(took / floor, 3),
                "peak_gib": round(peak.gib, 2), "pack_bytes": pack_bytes(pack),
                "floor": "bare δ loop over the same chunks of facts, as many steps as the slowest fact took",
            }
            print(json.dumps({f"{method}_{n}": result[f"{method}_{n}"]}), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
