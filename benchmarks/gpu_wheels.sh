#!/usr/bin/env bash
# Wheels that a lent H200 machine lacks for autoep (its image has torch, tokenizers, safetensors,
# huggingface-hub, tqdm and rich, but no pydantic, and an older transformers than the tests run):
# downloaded here, into .whl/ (ignored by git), for the device tool to carry. See docs/training.md.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2 typing-extensions==4.15.0
ls -l .whl
