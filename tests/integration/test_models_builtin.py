"""The built-in models for real: SmolLM2's knowledge, a cached load in a fresh process, concurrent first conversions."""

import subprocess
import sys


from editpack.model.generation import generate
from editpack.model.loading import load_model


# ------------------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_knows_paris(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    text = generate(model, tokenizer, "The capital of France is", max_new_tokens=5)
    assert text.strip().startswith("Paris")


def test_cached_builtin_loads_fast_in_a_fresh_process(smollm2):
    code = "import time, editpack; t=time.perf_counter(); editpack.load_model(); print(time.perf_counter()-t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds = float(out.stdout.strip().splitlines()[-1])
    print(f"cached smollm2-135m load: {seconds:.2f} s")  # recorded, not asserted: timings belong in bench/


def test_concurrent_first_conversions_share_one_result(isolated_home, real_model):
    code = "import editpack.model.builtins as m; print(m.ensure_builtin('smollm2-135m'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    folder = isolated_home / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    leftovers = [p.name for p in (isolated_home / "models").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"
    model, tokenizer = load_model("smollm2-135m")
    assert generate(model, tokenizer, "The capital of France is", max_new_tokens=3).strip().startswith("Paris")
