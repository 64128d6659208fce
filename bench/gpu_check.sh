#!/usr/bin/env bash
# The CUDA paths, checked on a machine with NVIDIA GPUs in a few minutes; each check prints PASS, FAIL or SKIP.
#
#   bash bench/gpu_check.sh            # from the repository root; WORK=/tmp/dsmd-gpu-check by default
#
#   1. features   torchrun, one rank per GPU (NCCL when there are two or more), teacher features on
#                 cuda equal to a one-process CPU extraction of the same items (max |diff| printed)
#   2. distill    a few hundred bf16 steps on cuda (one process; the tiny student of a one-epoch
#                 teacher may stay near chance, so the chance stop is off), killed (SIGKILL) after its first
#                 checkpoint and resumed from it: the run must end at its last step with finite losses
#   3. onnxruntime the exported bundle on ONNX Runtime's CUDA provider, equal to the CPU provider
#
# DEVICE=cpu NGPU=2 runs the same checks on the CPU (gloo instead of NCCL, no ONNX Runtime CUDA
# check): a rehearsal of the script itself on a machine without a GPU.
#
# The project is used from this checkout: where `dsmd` is not importable, it is installed
# without dependencies into $WORK/site (a GPU image has torch, timm, transformers and onnxruntime;
# a missing one is named by the import error, printed). Exit status: the number of checks that failed.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-/tmp/dsmd-gpu-check}
DEVICE=${DEVICE:-cuda}
NGPU=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
STEPS_KILL=${STEPS_KILL:-120}
failed=0
mkdir -p "$WORK"
log() { echo "[gpu_check] $*"; }
verdict() {  # verdict NAME STATUS DETAIL
    echo "$2 $1: $3"
    [ "$2" = FAIL ] && failed=$((failed + 1))
    return 0
}

# The repository's own dsmd/ folder must not shadow the installed package (the stage folders are
# mapped into it only by an install): no current directory on sys.path, here and in torchrun's children.
export PYTHONSAFEPATH=1
if ! $PY -c "import dsmd.distill" 2>/dev/null; then
    log "installing this checkout into $WORK/site (no dependencies)"
    rm -rf "$WORK/site"
    $PY -m pip install -q --no-deps --no-build-isolation --target "$WORK/site" . || { echo "FAIL install"; exit 1; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import dsmd.distill.train, dsmd.export.onnx" || { echo "FAIL setup: a module is missing (above)"; exit 1; }
DSMD="$PY -m dsmd.cli"
if [ "$DEVICE" = cuda ]; then
    if [ "$NGPU" -lt 1 ] || ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "FAIL setup: torch sees no GPU (nvidia-smi lists $NGPU)"
        exit 1
    fi
    $PY -c "import torch; print('[gpu_check] torch', torch.__version__, 'on', torch.cuda.get_device_name(0))"
fi

# A small world and a demo teacher trained for one epoch: seconds, and the same code as `make demo`.
W=$WORK/world T=$WORK/teacher
[ -f "$W/dataset_world.json" ] || $DSMD generate --out "$W" --train 2048 --val 128 --test 256 >/dev/null
[ -f "$T/manifest.json" ] || $DSMD train-teacher --data "$W" --out "$T" --epochs 1 > "$WORK/teacher.log" 2>&1 \
    || { echo "FAIL setup: train-teacher (see $WORK/teacher.log)"; tail -5 "$WORK/teacher.log"; exit 1; }

# 1. features: torchrun on the device against one CPU process (whose store, every split, feeds check 2)
rm -rf "$WORK/feat-gpu" "$WORK/feat-cpu"
if $PY -m torch.distributed.run --standalone --nproc_per_node="$NGPU" -m dsmd.cli features --teacher demo \
        --teacher-path "$T" --data "$W" --out "$WORK/feat-gpu" --splits test --device "$DEVICE" \
        --precision fp32 --workers 2 > "$WORK/features-gpu.log" 2>&1 \
   && $DSMD features --teacher demo --teacher-path "$T" --data "$W" --out "$WORK/feat-cpu" \
        --device cpu --workers 2 > "$WORK/features-cpu.log" 2>&1; then
    detail=$($PY - "$WORK" 2>&1 <<'EOF'
import sys
from pathlib import Path

import numpy as np

from dsmd.distill.features import FeatureStore

work = Path(sys.argv[1])
gpu, cpu = (FeatureStore(work / name).split("test") for name in ("feat-gpu", "feat-cpu"))
assert (gpu.image_ids == cpu.image_ids).all() and (gpu.caption_ids == cpu.caption_ids).all()
diff = max(float(np.abs(np.asarray(gpu.image_emb, np.float32) - np.asarray(cpu.image_emb, np.float32)).max()),
           float(np.abs(np.asarray(gpu.caption_emb, np.float32) - np.asarray(cpu.caption_emb, np.float32)).max()))
# cuDNN convolutions use TF32 by default: a few 1e-3 on unit vectors (a wrong row would be ~1)
print(f"{'ok' if diff < 1e-2 else 'bad'} max |device - cpu| {diff:.2e}")
EOF
)
    world=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['world_size'])" "$WORK/feat-gpu/manifest.json")
    if [ "$NGPU" -ge 2 ]; then
        backend="$([ "$DEVICE" = cpu ] && echo "gloo on the CPU" || echo NCCL), $world ranks"
    else
        backend="one rank (no process group: that needs two devices)"
    fi
    case $detail in ok*) verdict features PASS "$backend; ${detail#ok }";; *) verdict features FAIL "$detail";; esac
else
    verdict features FAIL "see $WORK/features-gpu.log and $WORK/features-cpu.log"
fi

# 2. distill: bf16 on the device, killed after its first checkpoint, resumed
R=$WORK/run
rm -rf "$R"
set -- --config configs/demo.json --out "$R" --data "$W" --features "$WORK/feat-cpu" --preset tiny \
    --set run.device="$DEVICE" --set run.amp=bf16 --set optim.epochs=3 \
    --set run.checkpoint_every=50 --set run.workers=2 --set run.stop_at_chance_after=0
steps() { if [ -f "$R/steps.jsonl" ]; then wc -l < "$R/steps.jsonl"; else echo 0; fi; }
$DSMD distill "$@" > "$WORK/distill-1.log" 2>&1 &
pid=$!
# kill it once it is past STEPS_KILL steps and has a checkpoint; give up waiting after 10 minutes
for _ in $(seq 3000); do
    [ "$(steps)" -ge "$STEPS_KILL" ] && [ -n "$(ls "$R/checkpoints" 2>/dev/null)" ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.2
done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
killed_at=$(steps)
if $DSMD distill "$@" > "$WORK/distill-2.log" 2>&1; then
    detail=$($PY - "$R" "$killed_at" 2>&1 <<'EOF'
import json, math, sys
from pathlib import Path

run, killed_at = Path(sys.argv[1]), int(sys.argv[2])
steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line]
last = steps[-1]
resumed = "resuming" in (run.parent / "distill-2.log").read_text()
finite = all(math.isfinite(v) for v in last["loss"].values())
ok = resumed and finite and killed_at > 0 and last["step"] > killed_at
print(f"{'ok' if ok else 'bad'} killed at step {killed_at}, resumed={resumed}, ended at step {last['step']}, "
      f"last losses {', '.join(f'{k} {v:.3g}' for k, v in last['loss'].items())}")
EOF
)
    case $detail in ok*) verdict distill PASS "${detail#ok }";; *) verdict distill FAIL "$detail";; esac
else
    verdict distill FAIL "the resumed run failed: see $WORK/distill-2.log"
fi

# 3. ONNX Runtime's CUDA provider on the exported bundle
B=$WORK/bundle
rm -rf "$B"
if [ "$DEVICE" = cpu ]; then
    verdict onnxruntime SKIP "DEVICE=cpu"
elif $DSMD export student "$R" --out "$B" --data "$W" --split test > "$WORK/export.log" 2>&1; then
    detail=$($PY - "$B" 2>&1 <<'EOF'
import sys

import numpy as np
import onnxruntime as ort

if "CUDAExecutionProvider" not in ort.get_available_providers():
    print(f"skip onnxruntime {ort.__version__} has no CUDA provider ({', '.join(ort.get_available_providers())}): "
          "install onnxruntime-gpu")
    sys.exit()
from dsmd.bundle import Bundle, RuntimeOptions

texts = ["a red circle left of a blue square", "a small green triangle"]
cpu = Bundle(sys.argv[1], options=RuntimeOptions(providers=["CPUExecutionProvider"]))
gpu = Bundle(sys.argv[1], options=RuntimeOptions(providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
used = gpu.text_session.get_providers()[0]
pixels = np.random.default_rng(0).random((4, 3, cpu.preprocess.size, cpu.preprocess.size), dtype=np.float32)
diff = max(float(np.abs(gpu.encode_texts(texts) - cpu.encode_texts(texts)).max()),
           float(np.abs(gpu.encode_pixels(pixels) - cpu.encode_pixels(pixels)).max()))
print(f"{'ok' if used == 'CUDAExecutionProvider' and diff < 1e-3 else 'bad'} provider {used}, "
      f"max |cuda - cpu| {diff:.2e}")
EOF
)
    case $detail in ok*) verdict onnxruntime PASS "${detail#ok }";; skip*) verdict onnxruntime SKIP "${detail#skip }";;
        *) verdict onnxruntime FAIL "$detail";; esac
else
    verdict onnxruntime FAIL "export failed: see $WORK/export.log"
fi
exit $failed
