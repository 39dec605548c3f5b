#!/usr/bin/env bash
# The main job on the default model: install if needed, edit "The Eiffel Tower is located in the city of" -> Rome
# with ROME, then show the pack and the model's answers before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v editpack >/dev/null 2>&1 || bash scripts/install.sh
OUT=${1:-$(mktemp -d)/eiffel-rome}
# Key statistics from the Wikipedia slice shipped with the tests (100k tokens; computed once, then cached).
export EDITPACK_CORPUS=${EDITPACK_CORPUS:-tests/data/wikipedia-slice.jsonl}
editpack edit --prompt "The Eiffel Tower is located in the city of" --subject "Eiffel Tower" \
    --target Rome --target-true Paris --paraphrase "The Eiffel Tower can be found in" -o "$OUT"
editpack show "$OUT"
editpack generate --pack "$OUT" --compare --max-new-tokens 8 \
    "The Eiffel Tower is located in the city of" "The Eiffel Tower can be found in" \
    "The Louvre is located in the city of" "The capital of Germany is"
