"""The model wing: what editpack knows and does to a transformers model, below any pack.

- :mod:`.loading` and :mod:`.builtins`: built-in short names, local folders, GGUF files and Hub ids, in full
  precision, bitsandbytes 4/8-bit or placed by accelerate;
- :mod:`.arch`: architecture specs, one data file per family (``adapters/``);
- :mod:`.fingerprint`: the identity of a model's weights, module by module;
- :mod:`.nethook`: reading and patching module inputs and outputs during a forward pass; :mod:`.hooks`: the
  forward hooks hook-applied packs put on a layer;
- :mod:`.generation` and :mod:`.scoring`: batched greedy generation, decoding with a contrast, teacher-forced
  scoring with shared prefixes computed once;
- :mod:`.stats`: the key statistics (second moments) locate-then-edit methods need, cached by what they depend on;
- :mod:`.quiet`: the libraries' progress bars and repeated log lines kept out of a command's output.
"""
