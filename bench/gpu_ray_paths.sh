#!/usr/bin/env bash
# The GPU paths through Ray, each once, each against its bare loop in the same run (issue 15):
# SD-VAE encode (Ray Data GPU actor vs a plain loop), training (Ray Train, 1 worker, --use-gpu vs the bare
# loop), and evaluation's sampling actors (eager fp32 vs compiled bf16). Random SD-VAE weights and noise
# images: the speed is the real one, the numbers mean nothing. Results go to $OUT (default bench/results):
# encode_throughput_gpu.jsonl, train_overhead_gpu.jsonl, sampling_gpu.json.
#
# On the lent GPU machine, after installing the wheel bundles (../shared/tools/gpu-wheels.sh explains how):
#   export PYTHONPATH=$PWD:/tmp/site1:/tmp/site2 PATH=/tmp/site1/bin:/tmp/site2/bin:$PATH
#   OUT=$OUT bash bench/gpu_ray_paths.sh
# A CPU dry run at toy sizes: RES=64 IMAGES=40 TRAIN_PRESET=demo SAMPLES=64 bash bench/gpu_ray_paths.sh
set -euo pipefail
OUT=${OUT:-bench/results}
RES=${RES:-256}                      # crop side in pixels
IMAGES=${IMAGES:-2000}               # synthetic images (10 classes)
TRAIN_PRESET=${TRAIN_PRESET:-imagenet256-B2}
TRAIN_STEPS=${TRAIN_STEPS:-60}
SAMPLES=${SAMPLES:-2048}
WORK=${WORK:-/tmp/sddit-gpu}
GPU=$(python -c "import torch; print(int(torch.cuda.is_available()))")
mkdir -p "$OUT" "$WORK"
python bench/random_sd_vae.py --out "$WORK/vae"
python bench/synthetic_images.py --out "$WORK/images" --classes 10 --per-class $((IMAGES / 10))

echo "== encode: Ray Data with the SD-VAE actor vs a plain loop"
python bench/encode_throughput.py --data "$WORK/images" --codec sd-vae --vae "$WORK/vae" --resolution "$RES" \
  --batch-size 64 --out "$OUT/encode_throughput_gpu.jsonl"
python pipelines/encode.py --data "$WORK/images" --out "$WORK/latents" --codec sd-vae --vae "$WORK/vae" \
  --resolution "$RES" --run-dir "$WORK/runs"

echo "== train: Ray Train (1 worker) vs the bare loop"
GPU_FLAG=$([ "$GPU" = 1 ] && echo --use-gpu || true)
python bench/train_overhead.py --data "$WORK/latents" --preset "$TRAIN_PRESET" $GPU_FLAG --steps "$TRAIN_STEPS" \
  --repeats 2 --run-dir "$WORK/runs/overhead" --out "$OUT/train_overhead_gpu.jsonl"

echo "== evaluate: sampling actors, eager fp32 vs compiled bf16"
python pipelines/train.py --data "$WORK/latents" --preset "$TRAIN_PRESET" $GPU_FLAG --steps 10 --name gpu-paths \
  --set train.checkpoint_every=10 train.sample_every=10 --run-dir "$WORK/runs"
CHECKPOINT=$(ls -d "$WORK"/runs/ray/gpu-paths/checkpoint_* | tail -1)
for variant in "fp32" "bf16 --compile"; do
  set -- $variant
  python pipelines/evaluate.py --checkpoint "$CHECKPOINT" --num-samples "$SAMPLES" --steps 18 --cfg-scale 1.5 \
    --batch-size 256 --extractor domain --precision "$1" ${2:-} --out "$WORK/eval-$1${2:+-compiled}" --run-dir "$WORK/runs"
done
python - "$WORK" "$OUT/sampling_gpu.json" <<'PY'
import json, sys, pathlib
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = {p.parent.name: json.loads(p.read_text()) for p in sorted(work.glob("eval-*/sampling.json"))}
out.write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PY
