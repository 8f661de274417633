#!/usr/bin/env bash
# Download, here, the wheels the GPU check needs on the device machine (Python 3.12, x86-64, no network),
# into benchmarks/gpu/wheels/ (ignored by git; carried with carry=["benchmarks/gpu/wheels"]).
#
#     bash benchmarks/gpu/prepare.sh            # versions pinned to what .venv has installed
#
# Only what that machine lacks (see /work/.library/device/KINDS.md, "Python packages already there"):
#   diffusers                 not there at all (the engine's core)
#   transformers              there as 5.17; carried at .venv's version so both machines run the same text encoder
#                             code (PREPARE_TRANSFORMERS=0 leaves it out and uses the machine's: ~12 MB less)
#   torchsde, trampoline      DPM++ SDE samplers (diffusers' DPMSolverSDEScheduler)
#   fastapi, starlette, pydantic, pydantic-core (cp312), annotated-types, typing-inspection,
#   opentelemetry-api, uvicorn, python-multipart
#                             the HTTP server (not used by the check itself, small; lets `import brushwork.server` work)
# Not carried, because the machine has them (and the project accepts its versions): torch (its CUDA build),
# accelerate 1.15 (= .venv), safetensors 0.8 (= .venv), huggingface_hub 1.33 (diffusers wants >=1.32; .venv's 2.x
# would also need httpx2 and a newer hf-xet), tokenizers, numpy, pillow, click, pyyaml, tqdm, regex, requests,
# filelock, scipy, anyio, h11, typing-extensions. invisible-watermark is left out: it is only imported when a
# picture is watermarked, and the check runs with watermark=False (it would also need PyWavelets and opencv).
# The project itself travels as source (src/ is in the working tree): run.sh puts src/ on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DEST=benchmarks/gpu/wheels

packages=(diffusers torchsde trampoline fastapi starlette pydantic pydantic_core annotated-types typing-inspection
          opentelemetry-api uvicorn python-multipart)
[ "${PREPARE_TRANSFORMERS:-1}" = 1 ] && packages+=(transformers)

# one pinned version each: the one installed in .venv
pins=$("$PY" - "${packages[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)
echo "pins: $pins"

rm -rf "$DEST"
mkdir -p "$DEST"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DEST" $pins

# exactly one wheel per package (two versions of one would stop the install there)
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
    echo "more than one wheel of: $dupes" >&2
    exit 1
fi
echo "$pins" | tr ' ' '\n' >"$DEST/PINS.txt"
ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $total bytes ($((total / 1024 / 1024)) MiB) in $(ls "$DEST"/*.whl | wc -l) wheels"
# the working tree and the carried paths together must stay under 64 MiB
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "working tree that travels: $((tree / 1024 / 1024)) MiB; with the wheels: $(((tree + total) / 1024 / 1024)) MiB (limit 64)"
if [ $((tree + total)) -gt $((60 * 1024 * 1024)) ]; then
    echo "too close to the 64 MiB limit: try PREPARE_TRANSFORMERS=0" >&2
    exit 1
fi
