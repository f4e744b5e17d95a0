#!/usr/bin/env bash
# The MambaIC quality ladder trained on a lent GPU in ONE device call (issue #12), then compared here on the CPU.
#
# Not yet run on a GPU: no session so far was lent one. The steps below were dry-run on the CPU (--dry-run).
#
# What it can and cannot do: training the `lite` config further can lift q1-q5 but cannot widen the ladder past
# about 0.3 bpp. Without quantisation lite's transforms reach 30.9 dB on the test photos, and the best linear
# transform of its 50 latent channels 32.9 dB, while JPEG reaches 33.3 dB at 0.48 bpp (bench/mambaic_ceiling.py,
# bench/results/codec-rd-cpu.md). So q6 is the `wide` config (100 latent channels, linear bound 35.6 dB) and q7
# the `wide160` config (160, 38.2 dB), each started from a two-stage KLT with its entropy model trained on it
# (scripts/init_mambaic_klt.py): on the CPU that start, after 25 minutes, was already 1.1 dB closer to JPEG at
# the same size than a wide q6 widened from the shipped q5 and trained 100 minutes (codec-rd-cpu.md).
# A linear start alone cannot get there: bench/mambaic_klt_bounds.py shows that even an ideal entropy model (scales
# known per 64 px block, for free) puts the 100-channel KLT 0.54 dB below JPEG at lambda 0.0483 (ahead of it only
# below about 0.55 bpp: +0.75 dB at lambda 0.013). So the joint stage has to teach the VSS blocks what a linear
# transform cannot do. (The lambdas stay compressai's zoo values for q6 and q7, as the shipped q1-q5 do.)
# Whether one call's minutes are enough for them is what it measures. The entropy-model stage trains on whole
# 16x16 latents (256 px crops): on the CPU, 42 minutes from the same start cut the test photos' rate 5.5% that way
# against 2.5% on 8x8 windows at the same number of latents a step (codec-rd-cpu.md).
#
# Prepare here, once (the data and wheels travel with the call; with the tree about 62 MB of the 64 MiB):
#   mkdir -p runs/gpu-carry && cp -r /work/photo-corpus/train runs/gpu-carry/     # the 288 PNG crops, 31 MB
#   echo /.whl/ >> .git/info/exclude        # then, for the device image's python 3.12 (it lacks these two):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_34_x86_64 -d .whl compressai==1.2.8
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pytorch-msssim==1.0.0
#   bash bench/gpu_codec_ladder.sh --dry-run            # here, on the CPU: a few steps of every stage
# On the device (one call, timeout_s 590, carry [".whl", "runs/gpu-carry"]):
#   bash bench/gpu_codec_ladder.sh
# What it does there:
#   1. installs the two wheels and this checkout (no network);
#   2. checks the Triton selective scan against its reference on CUDA (falls back to the torch scan if not);
#   3. times 20 training steps, then sizes every stage to its share of TRAIN_SECONDS;
#   4. trains four chains side by side on the one GPU: q4 (lambda 0.013) -> q5 from the shipped q4, q3 (0.0067)
#      -> q2 -> q1 from the shipped q3 (batch 16 of 256 px crops, cosine 1e-4 -> 1e-5 per stage, bfloat16
#      autocast), and q6 (0.0483, wide) and q7 (0.0932, wide160) each from its KLT start (a quarter of the time
#      on the entropy model alone, then everything, cosine 3e-4 -> 3e-5);
#   5. writes every quality's weights in fp16 (about 4.3 MB each, wide 8.2 MB, wide160 15 MB) and the logs to
#      $OUT.
# Afterwards, here: save each in fp16 (save_checkpoint(half_parameters=True)), evaluate them with
# `effvision eval-codec --checkpoint` on the test photos beside the shipped ladder, and ship the better.
set -uo pipefail
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out="${OUT:-runs/gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
train_seconds="${TRAIN_SECONDS:-300}"
device=cuda
batch=16
crop=256
if [ "$dry" = 1 ]; then
    python="${PYTHON:-.venv/bin/python}"; device=cpu; batch=2; crop=64; train_seconds=40
else
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
    "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 \
        || { cat "$out/install.log"; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/gpu-device.txt" 2>&1
fi

backend=auto
if [ "$dry" = 0 ]; then
    if ! timeout 100 "$python" -m pytest -q -x tests/test_kernels_cuda.py -k scan >"$out/scan-check.log" 2>&1; then
        echo "Triton scan check failed (see scan-check.log): training with the torch scan"; backend=torch
    fi
fi

# seconds per step, measured: 20 steps of the q4 model at this batch and crop
per_step=$("$python" - "$device" "$batch" "$crop" "$backend" <<'EOF'
import sys, tempfile, time
sys.path.insert(0, "scripts")
import torch
from effvision.codecs.mambaic.checkpoint import load_checkpoint
from effvision.codecs.mambaic.train import TrainSettings, train
device, batch, crop, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = load_checkpoint("effvision/assets/mambaic-lite-q4.safetensors", expected_config="lite")
for module in model.modules():
    if hasattr(module, "scan_backend"):
        module.scan_backend = backend
images = [torch.rand(3, 2 * crop, 2 * crop) for _ in range(4)]
steps = 3 if device == "cpu" else 20
settings = TrainSettings(lmbda=0.013, steps=steps, batch_size=batch, crop=crop, progress=False)
train(model, images, TrainSettings(lmbda=0.013, steps=2, batch_size=batch, crop=crop, progress=False),
      device=device)  # warm-up: Triton compiles, autotunes
started = time.time()
train(model, images, settings, device=device)
if device == "cuda":
    torch.cuda.synchronize()
print(f"{(time.time() - started) / steps:.4f}")
EOF
)
[ -n "$per_step" ] || { echo "timing run failed"; exit 1; }
# three stages a chain; the first (the longest from its shipped model's lambda) gets half the time
long=$("$python" -c "print(max(2, int($train_seconds * 0.5 / $per_step)))")
short=$("$python" -c "print(max(2, int($train_seconds * 0.25 / $per_step)))")
minutes=$("$python" -c "print(round($train_seconds / 60 * 0.5 * 1.15, 2))")
echo "seconds per step: $per_step; stage steps: $long, $short, $short (cap $minutes min a stage); scan: $backend"
echo "$per_step" >"$out/seconds-per-step.txt"

corpus=runs/gpu-carry/train
assets=runs/gpu-assets
rm -rf "$assets" && mkdir -p "$assets"  # only this run's weights go back
common=(--corpus "$corpus" --work-dir runs/gpu-ladder --assets "$assets" --batch-size "$batch" --crop "$crop"
        --lr 1e-4 --final-lr 1e-5 --device "$device" --scan-backend "$backend" --stage-minutes "$minutes")
"$python" scripts/train_mambaic_ladder.py "${common[@]}" --init effvision/assets/mambaic-lite-q4.safetensors \
    --chain "4:0.013:$long" "5:0.025:$long" >"$out/chain-high.log" 2>&1 &
high=$!
# the upper rungs start from a two-stage KLT (scripts/init_mambaic_klt.py): a quarter of the time trains their
# entropy model on the fixed linear transforms, the rest fine-tunes everything
klt_minutes=$("$python" -c "print(round($train_seconds / 60 * 0.25, 2))")
joint_minutes=$("$python" -c "print(round($train_seconds / 60 * 0.7, 2))")
joint_steps=$("$python" -c "print(max(2, int($train_seconds * 0.7 / $per_step / 1.3)))")
upper_rung() {  # QUALITY LAMBDA CONFIG
    "$python" scripts/init_mambaic_klt.py --lambda "$2" --config "$3" --corpus "$corpus" --device "$device" \
        --steps 100000 --minutes "$klt_minutes" --batch-size "$batch" --latent-crop 16 --threads 4 \
        --out "runs/gpu-klt/$3-q$1-init.safetensors" \
        && "$python" scripts/train_mambaic_ladder.py "${common[@]}" --lr 3e-4 --final-lr 3e-5 --config "$3" \
        --stage-minutes "$joint_minutes" --work-dir "runs/gpu-ladder-$3" \
        --init "runs/gpu-klt/$3-q$1-init.safetensors" --chain "$1:$2:$joint_steps"
}
upper_rung 6 0.0483 wide >"$out/chain-q6.log" 2>&1 &
q6=$!
upper_rung 7 0.0932 wide160 >"$out/chain-q7.log" 2>&1 &
q7=$!
"$python" scripts/train_mambaic_ladder.py "${common[@]}" --init effvision/assets/mambaic-lite-q3.safetensors \
    --chain "3:0.0067:$long" "2:0.0035:$short" "1:0.0018:$short" >"$out/chain-low.log" 2>&1 &
low=$!
failed=0
wait "$high" || { echo "high chain failed"; failed=1; }
wait "$low" || { echo "low chain failed"; failed=1; }
wait "$q6" || { echo "q6 chain failed"; failed=1; }
wait "$q7" || { echo "q7 chain failed"; failed=1; }
tail -n 3 "$out/chain-high.log" "$out/chain-low.log" "$out/chain-q6.log" "$out/chain-q7.log"
# $OUT returns at most 8 files: seven fp16 weight files and one archive of the logs
"$python" - "$assets" "$out" <<'PY'
import sys
from pathlib import Path
from effvision.codecs.mambaic.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
source, target = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(source.glob("mambaic-*-q*.safetensors")):
    _, metadata = read_checkpoint_config(path)
    save_checkpoint(load_checkpoint(path), target / path.name, extra=dict(metadata),
                    half_parameters=True)
    print("fp16:", target / path.name)
PY
(cd "$out" && tar czf logs.tar.gz --remove-files ./*.log ./*.txt)
ls -la "$out"
exit "$failed"
