"""Packs for the runtimes that serve models: multi-LoRA engines (:mod:`.engines`: vLLM, SGLang, LoRAX, TGI),
llama.cpp (:mod:`.gguf`: a GGUF LoRA adapter or a whole edited GGUF) and merged transformers folders
(:mod:`.merged`)."""

from .common import EXPORT_RECORD, Export, ExportError
from .engines import EngineRules, check_export, engine_rules, engines, export_peft
from .gguf import check_gguf_output, export_gguf
from .merged import export_merged

__all__ = ["EXPORT_RECORD", "EngineRules", "Export", "ExportError", "check_export", "check_gguf_output",
           "engine_rules", "engines", "export_gguf", "export_merged", "export_peft"]
