"""Describing a pack without loading its payload: the manifest, whether the files verify, and a text summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PackFormatError
from ..packs.artifact import load_pack, verify_files
from ..packs.manifest import read_manifest
from .hub import parse_reference, pull

_RELATIONS = {"onto": "made on top of", "stacked": "stacked from", "extends": "extends"}


@dataclass(frozen=True)
class PackDescription:
    """What ``editpack show`` prints: the manifest and the verification problems (empty when it verifies)."""

    manifest: dict[str, Any]
    problems: list[str]
    location: str

    @property
    def verified(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": self.manifest, "verified": self.verified, "problems": self.problems}

    def __str__(self) -> str:
        m = self.manifest
        base = m["base_model"]
        lines = [f"{m['name']} {m['version']}  ({m['kind']} pack, created {m['created']})",
                 f"method:  {m['method']}",
                 f"base:    {base['id']} ({base['model_type']})"
                 + (f", fingerprint {base['fingerprint'][:23]}…" if base.get("fingerprint") else "")]
        memory, delta = m.get("memory"), m.get("delta")
        if isinstance(memory, dict):
            contrast = m["hyperparameters"].get("contrast")
            lines.append(f"memory:  {memory.get('n_facts')} facts, scope threshold {memory.get('threshold')} "
                         f"(route {m['hyperparameters'].get('route')}"
                         + (f", contrast {contrast}" if contrast else "") + "); weights untouched")
        if isinstance(delta, dict) and isinstance(delta.get("modules"), dict):
            lines.append("delta:   " + ", ".join(
                f"{name} (rank {v.get('rank')}{', dense' if v.get('form') == 'dense' else ''})"
                for name, v in delta["modules"].items() if isinstance(v, dict)))
        codebook, router = m.get("codebook"), m.get("router")
        if isinstance(codebook, dict):
            lines.append(f"codebook: {codebook.get('entries')} entries at {codebook.get('module')} (keys of width "
                         f"{codebook.get('key_dim')}); weights untouched")
        if isinstance(router, dict):
            lines.append(f"router:  side memory of {router.get('module')} where ‖ΔW x‖ > {router.get('threshold')}; "
                         "weights untouched")
        for parent in m.get("parents") or []:
            how = _RELATIONS.get(parent.get("relation", "onto"), parent.get("relation"))
            lines.append(f"lineage: {how} {parent.get('name')}@{parent.get('version')} "
                         f"({str(parent.get('content'))[:19]}…)")
        facts = m["facts"]
        lines.append(f"facts:   {len(facts)}")
        for fact in facts[:20]:
            if not isinstance(fact, dict):
                continue
            old = f"  (was {fact['target_true']})" if fact.get("target_true") else ""
            lines.append(f"  - {str(fact.get('prompt')).replace('{}', str(fact.get('subject')))} -> "
                         f"{fact.get('target_new')}{old}")
        if len(facts) > 20:
            lines.append(f"  … {len(facts) - 20} more")
        lines.append("files:")
        lines += [f"  {name}  sha256:{digest[:16]}…" for name, digest in m["files"].items()]
        lines.append("verified: yes" if self.verified else "verified: NO\n  " + "\n  ".join(self.problems))
        return "\n".join(lines)


def describe(reference: str | Path, *, token: str | None = None, endpoint: str | None = None) -> PackDescription:
    """Describe a pack directory or a Hub reference ``user/name[@version]`` (pulled through the HF cache).

    The manifest's shape is checked; file problems are reported in ``problems`` rather than raised, so a damaged
    pack can still be inspected.
    """
    directory = Path(str(reference))
    links_into = None
    if not directory.exists() and parse_reference(str(reference)):
        directory = pull(str(reference), token=token, endpoint=endpoint).path
        links_into = directory.parent.parent  # read in place from the Hugging Face cache
    manifest = read_manifest(directory, links_into=links_into)
    problems = verify_files(directory, manifest, links_into=links_into)
    if not problems:  # the files are the manifest's: now everything loading checks (tensors, config, base, scale)
        try:
            load_pack(directory, links_into=links_into)
        except PackFormatError as exc:
            problems.append(str(exc))
    return PackDescription(manifest, problems, str(reference))
