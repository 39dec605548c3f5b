"""Key statistics: tokens per second against a plain forward, one pass for five layers, samples kept.

    python3 -m bench.key_stats [--tokens 1000000] [--layer 5] [--run 3,4,5,6,7] [--sampled 20000] [--small]

In one process, each in a fresh private cache (``EDITPACK_HOME`` is a temporary folder, so nothing is reused by
accident): corpus statistics for one layer (``--tokens``), and the floor: a plain forward of the same batches
through the blocks up to that layer; the five layers of a MEMIT run in one pass against one layer alone; and
statistics from the model's own samples: the first layer (which samples) and a second layer (which reuses the
kept samples). Prints one JSON object with ratios to the floor (``--out`` also writes it). ``--small`` runs a
tiny random model on a few thousand tokens (the test suite does that).
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

from bench._common import DATA, REPO, emit, forward_floor, private_home, timed  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--corpus", default=str(DATA / "corpus" / "wikipedia_en_sample.jsonl"))
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--run", default="3,4,5,6,7")
    parser.add_argument("--sampled", type=int, default=20_000)
    parser.add_argument("--small", action="store_true", help="a tiny random model and a few thousand tokens")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "key_stats.json"))
    args = parser.parse_args(argv)

    with private_home() as home:
        return run(args, home)


def run(args, home: str) -> dict:
    from editpack.model import stats
    from editpack.model.arch import spec_for
    from editpack.packs.statistics import cached_moments

    if args.small:
        from editpack.testing import WORDS, tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model("llama"), tiny_tokenizer()
        corpus = Path(home) / "corpus.jsonl"
        corpus.write_text("\n".join(json.dumps({"text": " ".join(WORDS[i:] + WORDS[:i])}) for i in range(40)) + "\n")
        args.corpus, args.tokens, args.layer, args.run, args.sampled = str(corpus), 3000, 1, "0,1,2", 600
    else:
        import editpack

        model, tokenizer = editpack.load_model(args.model)
        if not Path(args.corpus).is_file():
            args.corpus = str(REPO / "tests" / "data" / "wikipedia-slice.jsonl")
    spec = spec_for(model)
    run_layers = [int(x) for x in args.run.split(",")]
    config = stats.StatsConfig(corpus=args.corpus, n_tokens=args.tokens)

    (_, count, _), seconds = timed(lambda: stats.compute_second_moments(model, tokenizer, spec, [args.layer], config))
    floor_seconds, floor_tokens = forward_floor(model, tokenizer, spec, args.layer, config)
    few = stats.StatsConfig(corpus=args.corpus, n_tokens=max(args.tokens // 10, 1000))
    _, one_layer = timed(lambda: stats.compute_second_moments(model, tokenizer, spec, [max(run_layers)], few))
    _, all_layers = timed(lambda: stats.compute_second_moments(model, tokenizer, spec, run_layers, few))
    sampled = stats.StatsConfig(corpus=None, n_tokens=args.sampled)
    _, first_sampled = timed(lambda: cached_moments(model, tokenizer, spec, [run_layers[0]], sampled))
    _, later_sampled = timed(lambda: cached_moments(model, tokenizer, spec, [run_layers[-1]], sampled))
    result = {
        "benchmark": "key_stats", "model": getattr(getattr(model, "editpack_ref", None), "id", "tiny-llama"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "corpus_layer": {"layer": args.layer, "tokens": count, "seconds": round(seconds, 2),
                         "tokens_per_second": round(count / seconds), "seconds_per_million": round(1e6 * seconds / count, 1)},
        "floor_plain_forward": {"tokens": floor_tokens, "seconds": round(floor_seconds, 2),
                                "tokens_per_second": round(floor_tokens / floor_seconds)},
        "ratio_to_floor": round((count / seconds) / (floor_tokens / floor_seconds), 3),
        "one_pass": {"layers": run_layers, "tokens": few.n_tokens, "seconds_deepest_layer_alone": round(one_layer, 2),
                     "seconds_all_layers_one_pass": round(all_layers, 2),
                     "ratio_to_one_layer": round(all_layers / one_layer, 3)},
        "model_sampled": {"tokens": args.sampled, "first_layer_seconds": round(first_sampled, 2),
                          "later_layer_seconds": round(later_sampled, 2)},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    main()
