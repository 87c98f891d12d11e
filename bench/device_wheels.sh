#!/usr/bin/env bash
# Run here (with pip and a network) before bench/device.sh runs on the device machine: fills the
# git-ignored .whl/ that the device call carries with what that machine's image lacks:
#   - wheels of hydra-core, omegaconf and antlr4-python3-runtime for python 3.12 on x86-64 Linux
#     (antlr4 4.9.3 exists only as a source archive; it is pure Python, so it is built into a wheel here);
#   - r50k_base's tiktoken cache (.whl/tiktoken-cache) and Tiny Shakespeare (.whl/data).
# SHARED (default ../shared) holds the cache and the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${SHARED:-../shared}"

if [[ -d .whl ]]; then chmod -R u+w .whl; fi  # the copied cache may be read-only
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
# The versions installed here, which the tests pass with.
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)"
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"

cp -r "$SHARED/tiktoken-cache" .whl/tiktoken-cache
mkdir -p .whl/data && cp "$SHARED/data/tinyshakespeare.txt" .whl/data/
du -sh .whl && ls .whl
