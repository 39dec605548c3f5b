"""Does a WISE router tell the edits from their neighbours? One round of WISE on CounterFact records, then the
router's score ‖ΔW x‖ where each kind of prompt is answered, against the pack's threshold.

    python3 -m bench.router_overlap [--n 100] [--set KEY=VALUE ...] [--out FILE]

The first ``--n`` records of ``counterfact-edit.json`` are edited in one round (``editpack.edit(..., "wise")``,
``--set`` for its settings). At the side memory's module the script then takes the activation difference
``‖ΔW x‖`` (the router's score) at the position that answers each edit prompt, paraphrase and neighbourhood prompt
(with its own answer), and at every position of the model-sampled text the pack was calibrated on, and reports
their quantiles (10 / 50 / 90 %, min, max) with the threshold and the share of each kind above it. Finally it scores
the pack as made and with its threshold at 0 (every position routed: what the side memory does without its
router) under prob_compare and generate_match, so the router's share of the result is visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch


import editpack  # noqa: E402
import editpack.console  # noqa: E402
from editpack.evaluation.protocols import combine, measure  # noqa: E402
from editpack.model.generation import model_device  # noqa: E402
from editpack.methods.base import parse_settings  # noqa: E402
from editpack.methods.locate.keys import inputs_everywhere  # noqa: E402
from editpack.methods.locate.context import unrelated_texts
from editpack.methods.targets import text_batch  # noqa: E402
from editpack.model.nethook import Trace  # noqa: E402

from bench._common import DATA, emit  # noqa: E402
from lifelong import PROTOCOLS, scores  # noqa: E402


def quantiles(values: torch.Tensor, threshold: float) -> dict:
    q = torch.quantile(values, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])).tolist()
    return {"min": round(q[0], 2), "q10": round(q[1], 2), "median": round(q[2], 2), "q90": round(q[3], 2),
            "max": round(q[4], 2), "n": int(values.numel()), "routed": round(float((values > threshold).float().mean()), 3)}


def at_answers(model, tokenizer, module: str, delta: torch.Tensor, pairs) -> torch.Tensor:
    """‖ΔW x‖ at the position that predicts each pair's answer (its first token)."""
    batch = text_batch(tokenizer, pairs, model_device(model))
    first = torch.ones_like(batch.rows, dtype=torch.bool)
    first[1:] = batch.rows[1:] != batch.rows[:-1]
    with torch.no_grad(), Trace(model, module, retain_input=True, retain_output=False, stop=True) as trace:
        model(**batch.inputs)
    inputs = trace.input[batch.rows[first], batch.cols[first]].float()
    return (inputs @ delta.T).norm(dim=-1).cpu()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--data", default=str(DATA / "counterfact" / "counterfact-edit.json"))
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    editpack.console.configure()
    model, tokenizer = editpack.load_model(args.model)
    facts = editpack.load_facts(args.data, limit=args.n, skip_invalid=True)
    settings = parse_settings(args.settings)
    start = time.perf_counter()
    pack = editpack.edit(model, facts, "wise", **settings)
    result: dict = {"benchmark": "router_overlap", "model": model.editpack_ref.id, "data": Path(args.data).name,
                    "n": len(facts), "hyperparameters": pack.hyperparameters, "module": pack.module,
                    "threshold": pack.threshold, "seconds_edit": round(time.perf_counter() - start, 1)}
    delta = pack.delta.modules[pack.module].dense().float().to(model_device(model))
    kinds = {
        "edit prompts": [(f.text, f.target_new) for f in facts],
        "paraphrases": [(p, f.target_new) for f in facts for p in f.paraphrases],
        "neighbourhood prompts": [(p.prompt, p.answer) for f in facts for p in f.neighborhood],
    }
    result["activation_difference"] = {
        kind: quantiles(at_answers(model, tokenizer, pack.module, delta, pairs), pack.threshold)
        for kind, pairs in kinds.items() if pairs
    }
    count, length = pack.hyperparameters["unrelated_samples"]  # as the pack was calibrated (WISE records it)
    texts = unrelated_texts(model, tokenizer, count, length, pack.hyperparameters["seed"])
    sampled = inputs_everywhere(model, tokenizer, pack.module, texts).float().to(delta.device)
    result["activation_difference"]["model-sampled text, every position"] = quantiles(
        (sampled @ delta.T).norm(dim=-1).cpu(), pack.threshold)
    base = measure(model, tokenizer, facts, fluency_tokens=0)
    result["scores"] = {}
    for label, threshold in (("as made", pack.threshold), ("threshold 0 (side memory everywhere)", 0.0)):
        edited = editpack.apply(model, dataclasses.replace(pack, threshold=threshold))
        try:
            probes = measure(edited, tokenizer, facts, fluency_tokens=0)
        finally:
            model = editpack.revert(edited)
        result["scores"][label] = scores(combine(facts, base, probes, PROTOCOLS))
    return emit(result, args.out)


if __name__ == "__main__":
    main()
