#!/usr/bin/env bash
# The GPU check, in one call on the device machine (see benchmarks/gpu/README.md):
#
#     bash benchmarks/gpu/run.sh            # with carry=["benchmarks/gpu/wheels"], timeout_s=540
#
# Installs the carried wheels (benchmarks/gpu/prepare.sh made them) into a folder of its own, then runs, each part
# under its own timeout and all of them within GPU_CHECK_BUDGET_S (480 s):
#   pytest      pytest -m gpu tests/test_gpu.py                       -> $OUT/pytest.xml (+ its summary in summary.json)
#   unet        benchmarks/gpu/unet.py: SD 1.5 @512, SD 2.1 @768 UNet steps/s, diffusers fp16 eager vs brushwork's
#               policy, SDPA and channels_last each on/off, bf16, peak VRAM         -> $OUT/unet.json
#   step        benchmarks/step.py --device cuda (SD 1.5 UNet step + VAE decode)    -> $OUT/step.json
#   image_sd15  benchmarks/image.py --device cuda --gpu-families sd15: whole images, it/s and peak VRAM per
#   image_sd21  memory mode (high, medium, low, minimal), and sd21 likewise          -> $OUT/image.json
#   upscale     benchmarks/upscale.py --device cuda --memory low --sizes 512: the x4 upscaler's 512 -> 2048 (20 steps,
#               brushwork alone), wall time and peak VRAM (allocated, reserved; issue 13's goal: under 4 GB)
#                                                                                    -> $OUT/upscale.json
#   image_sdxl  benchmarks/image.py --device cuda --gpu-families sdxl: SDXL base at 1024 (random weights, built on
#               the GPU, saved as an fp16 single file, loaded by the engine), 10 steps, it/s and peak VRAM per memory
#               mode vs diffusers fp16 (its VAE's force_upcast); skipped under 120 s left   -> $OUT/image.json too
#   compile     unet.py with torch.compile (GPU_CHECK_COMPILE: default,max-autotune), with what time is left
#                                                                                    -> $OUT/compile.json
# After every part $OUT/summary.json is rewritten (machine, each part's state, test outcomes, the main numbers), so
# whatever stops the run, what ran is in $OUT. Without CUDA (here, on a CPU machine) it says so in summary.json,
# runs the GPU tests (all skipped) and no benchmark, in a few seconds.
#
# Knobs: GPU_CHECK_PARTS="pytest unet ..." (a subset, e.g. to rerun what failed), GPU_CHECK_BUDGET_S, GPU_CHECK_COMPILE,
# PY (the Python to use: .venv/bin/python where it exists, else python3), OUT (default /tmp/brushwork-gpu-out).
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/brushwork-gpu-out}
WORK=${GPU_CHECK_WORK:-/tmp/brushwork-gpu-work}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PARTS=" ${GPU_CHECK_PARTS:-pytest unet step image_sd15 image_sd21 upscale image_sdxl compile} "
COMPILE_MODES=${GPU_CHECK_COMPILE:-default,max-autotune}
RESERVE=25  # seconds kept for the last summary and a part's kill-after
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
export BRUSHWORK_HOME=$WORK/home TORCHINDUCTOR_CACHE_DIR=$WORK/inductor

echo "=== brushwork GPU check: $(date -u +%FT%TZ), budget ${BUDGET}s, parts:${PARTS}, python: $PY"

# ---- the carried wheels -----------------------------------------------------------------------------------------
SITE=$WORK/site
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
wheels=(benchmarks/gpu/wheels/*.whl)
if [ -e "${wheels[0]}" ] && [ "$pyver" = 3.12 ]; then
    echo "installing ${#wheels[@]} carried wheels into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --root-user-action=ignore \
            --target "$SITE" "${wheels[@]}"; then
        echo "carried: $(cd benchmarks/gpu/wheels && ls -- *.whl | tr '\n' ' ')" >"$WORK/install.txt"
    else
        echo "pip install of the carried wheels failed (see above)" | tee "$WORK/install.txt"
    fi
    [ -f benchmarks/gpu/wheels/PINS.txt ] && cp benchmarks/gpu/wheels/PINS.txt "$WORK/pins.txt"
    export PYTHONPATH=$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
    # the carried transformers needs a recent regex/tokenizers; where the machine's are older, use its own transformers
    if ! "$PY" -c "import transformers" 2>"$WORK/import.err"; then
        tail -5 "$WORK/import.err"
        if [ -d "$SITE"/transformers ]; then
            echo "the carried transformers does not import here: falling back to the machine's own" \
                | tee -a "$WORK/install.txt"
            rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
        fi
    fi
else
    echo "not installing carried wheels (python $pyver; wheels: ${#wheels[@]} in benchmarks/gpu/wheels, for 3.12):" \
         "using $PY's own packages" | tee "$WORK/install.txt"
    export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import diffusers, transformers, brushwork.engine.core; print('imports ok: diffusers', diffusers.__version__,
'transformers', transformers.__version__)" || echo "WARNING: the project does not import; the parts will fail"

# ---- the machine ------------------------------------------------------------------------------------------------
timeout 20 nvidia-smi || echo "nvidia-smi: not available"
timeout 60 "$PY" benchmarks/gpu/collect.py env "$WORK"
CUDA=$("$PY" -c "import json; print(int(bool(json.load(open('$WORK/env.json')).get('cuda_available'))))" \
       2>/dev/null || echo 0)

summarize() { timeout 30 "$PY" benchmarks/gpu/collect.py summary "$WORK" "$OUT" "$@" || echo "summary failed"; }

record() {  # record PART STATE RC SECONDS LIMIT [NOTE]
    printf '{"part": "%s", "state": "%s", "rc": %s, "seconds": %s, "limit_s": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6:-}" >>"$WORK/parts.jsonl"
}

part() {  # part NAME CAP_S MIN_S NEEDS_CUDA command...: run it under its own timeout, within what is left of BUDGET
    local name=$1 cap=$2 min=$3 needs_cuda=$4
    shift 4
    if [[ $PARTS != *" $name "* ]]; then
        record "$name" skipped null 0 0 "not in GPU_CHECK_PARTS"
        return
    fi
    if [ "$needs_cuda" = 1 ] && [ "$CUDA" != 1 ]; then
        record "$name" skipped null 0 0 "no CUDA device"
        summarize
        return
    fi
    local left=$((BUDGET - SECONDS - RESERVE))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt "$min" ]; then
        echo "=== $name: skipped, ${left}s left of the budget (it needs at least ${min}s)"
        record "$name" skipped null 0 "$limit" "not enough time left (${left}s, needs ${min}s)"
        summarize
        return
    fi
    echo "=== $name (limit ${limit}s, ${SECONDS}s so far): $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$PY" benchmarks/gpu/term.py "$@" 2>&1 | tee "$WORK/$name.log"
    local rc=${PIPESTATUS[0]} state=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then state=timeout; elif [ "$rc" != 0 ]; then state=failed; fi
    echo "=== $name: $state (rc $rc) in $((SECONDS - t0))s"
    record "$name" "$state" "$rc" "$((SECONDS - t0))" "$limit"
    summarize
}

# ---- the parts, most important first ----------------------------------------------------------------------------
part pytest 150 30 0 -m pytest -p no:cacheprovider -v -m gpu tests/test_gpu.py --junitxml="$WORK/pytest.xml" \
    -o junit_logging=system-out --durations=10
part unet 100 40 1 benchmarks/gpu/unet.py --out "$WORK/unet.json"
part step 60 30 1 benchmarks/step.py --device cuda --sizes 512 --rounds 5 --out "$WORK/step.json"
part image_sd15 120 60 1 benchmarks/image.py --device cuda --gpu-families sd15 --out "$WORK/image_sd15.json"
part image_sd21 150 80 1 benchmarks/image.py --device cuda --gpu-families sd21 --out "$WORK/image_sd21.json"
part upscale 120 50 1 benchmarks/upscale.py --device cuda --memory low --sizes 512 --plain-steps 0 \
    --brushwork-steps 20 --equal-steps 0 --out "$WORK/upscale.json"
# SDXL: ~3.5 B parameters made on the GPU, ~7 GB written and read back, then 4 modes (minimal streams the UNet layer by
# layer each step); under 120 s it would not get past the load, so it is skipped and compile gets the time
part image_sdxl 210 120 1 benchmarks/image.py --device cuda --gpu-families sdxl --steps 10 --out "$WORK/image_sdxl.json"
part compile 240 60 1 benchmarks/gpu/unet.py --families sd15:512 --variants diffusers_fp16,brushwork \
    --compile "$COMPILE_MODES" --out "$WORK/compile.json"

summarize --print
echo "=== done in ${SECONDS}s; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
