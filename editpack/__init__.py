"""editpack: knowledge edits of language models as versioned, shareable packs.

Public API (see the README):

- :func:`load_model` — built-in short names, local folders, GGUF files, Hub ids.
- :func:`load_pack` — read and verify a pack of any kind (:class:`EditPack` weights, :class:`MemoryPack`,
  :class:`CodebookPack` (GRACE), :class:`SideMemoryPack` (WISE)).
- :func:`edit` — compute an edit (ROME, MEMIT, AlphaEdit, UltraEdit, FT-M, LoRA, SERAC, GRACE, WISE) and return
  it as a pack;
  :func:`extend` — the next version of a pack, edited sequentially on top of it.
- :func:`apply` / :func:`revert` — put packs on a model (unmerged PEFT adapters or merged) and take them off;
  :func:`applied`, :func:`set_enabled`, :func:`remove` for one pack at a time; :func:`stack` sums packs into one.
- :func:`pipeline` — a transformers text-generation pipeline over an edited model.
- :func:`push` / :func:`pull` / :func:`versions` — packs on the Hugging Face Hub, by version;
  :func:`log` / :func:`diff` — a pack's versions and what changed between two of them.
- :func:`generate` — batched greedy continuations; :func:`chat_prompt` / :func:`chat_fact` — a prompt or a fact
  in the model's chat template (``edit``, ``extend`` and ``train`` take ``chat=True``).
- :func:`evaluate_pack` — a pack's facts under three protocols and its side effects on shipped suites.
- :mod:`editpack.model.arch` — architecture specs (data files, one per model family).
- :mod:`editpack.model.nethook` — read and patch module inputs/outputs during a forward pass.
"""

from ._version import __version__
from .api import edit, extend, train
from .chat import chat_fact, chat_prompt
from .errors import EditpackError, PackConflictError
from .evaluation.report import evaluate_pack
from .facts import Fact, Probe, load_facts, make_fact
from .model.arch import ArchSpec, spec_for
from .model.builtins import DEFAULT_MODEL
from .model.generation import generate
from .model.loading import load_model
from .packs.artifact import Artifact, load_pack
from .packs.codebook import CodebookPack
from .packs.editor import Editor
from .packs.memory.pack import MemoryPack
from .packs.side_memory import SideMemoryPack
from .packs.weights import EditPack
from .runtime.apply import AppliedPack, applied, apply, remove, revert, set_enabled
from .runtime.combine import stack
from .runtime.pipelines import pipeline
from .share.history import diff, log
from .share.hub import pull, push, versions

__all__ = [
    "__version__",
    "AppliedPack",
    "ArchSpec",
    "Artifact",
    "DEFAULT_MODEL",
    "EditPack",
    "EditpackError",
    "PackConflictError",
    "Fact",
    "Probe",
    "applied",
    "chat_fact",
    "chat_prompt",
    "diff",
    "log",
    "apply",
    "edit",
    "evaluate_pack",
    "extend",
    "generate",
    "load_facts",
    "load_model",
    "load_pack",
    "MemoryPack",
    "CodebookPack",
    "Editor",
    "SideMemoryPack",
    "make_fact",
    "pipeline",
    "pull",
    "push",
    "remove",
    "revert",
    "set_enabled",
    "spec_for",
    "stack",
    "train",
    "versions",
]
