"""How multi-LoRA serving engines read a PEFT adapter, one JSON file per engine (see :mod:`editpack.export`)."""
