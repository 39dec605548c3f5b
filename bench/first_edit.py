"""Time to the first edit of a model on a machine whose statistics cache is empty: the key statistics computed by
the edit itself, against pulled from a Hub server (``editpack edit --stats user/name@1.0.0``).

    python3 -m bench.first_edit [--model smollm2-135m] [--method rome] [--corpus FILE] [--tokens 100000] [--reuse-cache]

Each timing is one ``editpack edit`` command run as a user runs it (a fresh process: loading the model, the
statistics, the edit; ``--no-eval``), in its own empty ``EDITPACK_HOME`` (the converted model linked in, so only
the statistics differ) and Hugging Face cache. The statistics to pull are computed and pushed to a Hub-compatible
server on 127.0.0.1 first (``editpack.testing.hub``), not timed. ``ratio`` is computed over pulled;
``max_delta_difference`` is the largest difference between the two packs' dense weight updates (the same corpus
and token count, so it should be 0 up to float rounding).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, emit
from editpack.packs.artifact import load_pack
from editpack.model.builtins import BUILTINS, DEFAULT_MODEL, ensure_builtin
from editpack.testing.hub import HubServer

FACT = ["--prompt", "The Eiffel Tower is located in the city of", "--subject", "Eiffel Tower", "--target", "Rome"]


def fresh_home(root: Path, model: str) -> Path:
    home = root / "home"
    (home / "models").mkdir(parents=True)
    if model in BUILTINS:  # the converted model, not the statistics
        (home / "models" / model).symlink_to(ensure_builtin(model))
    return home


def editpack(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "editpack.cli.main", *args], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"editpack {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="rome")
    parser.add_argument("--corpus", default=str(REPO / "tests" / "data" / "wikipedia-slice.jsonl"))
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="default: bench/results/first_edit.json (the default model), "
                        "first_edit-MODEL.json (another)")
    parser.add_argument("--reuse-cache", action="store_true",
                        help="make the statistics to push in this machine's own cache (found there when an earlier "
                             "run computed them; not timed either way)")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "first_edit.json" if args.model == DEFAULT_MODEL else f"first_edit-{args.model}.json"
        args.out = str(REPO / "bench" / "results" / name)
    common = ["--model", args.model, "--method", args.method, *FACT, "--no-eval"]
    with tempfile.TemporaryDirectory(prefix="editpack-first-edit-") as scratch, HubServer() as hub:
        root = Path(scratch)
        base = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN=hub.token, HF_HUB_DISABLE_XET="1")
        base.pop("HF_HUB_OFFLINE", None)
        # The statistics to pull: computed and pushed beforehand (not timed).
        maker = dict(base, HF_HOME=str(root / "maker-hf"))
        if not args.reuse_cache:
            maker["EDITPACK_HOME"] = str(fresh_home(root / "maker", args.model))
        editpack(["stats", "compute", "--model", args.model, "--method", args.method, "--corpus", args.corpus,
                  "--tokens", str(args.tokens), "-o", str(root / "stats")], maker)
        editpack(["push", str(root / "stats"), "bench/stats"], maker)
        timings = {}
        for case, extra in (("computed", ["--corpus", args.corpus, "--set", f"stats_tokens={args.tokens}"]),
                            ("pulled", ["--stats", "bench/stats@1.0.0"])):
            env = dict(base, EDITPACK_HOME=str(fresh_home(root / case, args.model)), HF_HOME=str(root / f"{case}-hf"))
            timings[case] = round(editpack(["edit", *common, *extra, "-o", str(root / f"pack-{case}")], env), 1)
            print(f"{case}: {timings[case]} s", flush=True)
        difference = max_delta_difference(root / "pack-computed", root / "pack-pulled")
    return emit({"benchmark": "first_edit", "model": args.model, "method": args.method,
                 "corpus": Path(args.corpus).name, "tokens": args.tokens, "seconds": timings,
                 "ratio_computed_to_pulled": round(timings["computed"] / timings["pulled"], 2),
                 "max_delta_difference": difference}, args.out)


def max_delta_difference(first: Path, second: Path) -> float:
    a, b = load_pack(first).stored_factors(), load_pack(second).stored_factors()
    if sorted(a) != sorted(b):
        raise SystemExit(f"the two packs edit different modules: {sorted(a)} vs {sorted(b)}")
    return max(float((a[m].dense() - b[m].dense()).abs().max()) for m in a)


if __name__ == "__main__":
    main()
