#!/usr/bin/env bash
# The checks of one lent GPU session, in one call (device time is scarce): the environment,
# the trainer's CUDA path (ShopSynth, tiny preset, bf16, 60 steps) and the training throughput
# benchmark at ViT-B/16, 224 px, bf16, the largest batch that fits. Writes under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/eclip_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)"

echo "== trainer on CUDA (tiny preset, bf16)"
python3 -m eclip_app.cli -q synth --out /tmp/shop --products 600 --size 64 >/dev/null
python3 -m eclip_app.cli train --catalog /tmp/shop/train.jsonl --out /tmp/run --no-progress \
    --set steps=60 --set precision=bf16 --set log_every=20 --set checkpoint_every=30 2>&1 | tail -5
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/run/metrics.jsonl")]
for r in rows:
    print({k: r[k] for k in ("step", "loss_total", "samples_per_s", "data_wait_fraction")})
PY

echo "== the same from shards, bf16, compiled forward"
python3 -m eclip_app.cli -q shard --catalog /tmp/shop/train.jsonl --out /tmp/shards --max-count 100 --no-progress
python3 -m eclip_app.cli train --shards /tmp/shards --out /tmp/run_shards --no-progress --set steps=60 \
    --set precision=bf16 --set compile=true --set data_workers=4 --set log_every=20 --set checkpoint_every=30 2>&1 | tail -5
python3 - <<'PY'
import json
for r in (json.loads(l) for l in open("/tmp/run_shards/metrics.jsonl")):
    print({k: r.get(k) for k in ("step", "loss_total", "samples_per_s", "data_wait_fraction", "skipped_samples")})
PY

[ "${SKIP_THROUGHPUT:-0}" = 1 ] && exit 0
echo "== training throughput, ViT-B/16"
BATCH=${BATCH:-auto}  # 512 on an 80 GB H100 (768 runs out of memory with every row resident)
python3 benchmarks/train_throughput.py --model ViT-B-16 --precision bf16 --batch "$BATCH" \
    --steps 3 --rounds 5 --json "$OUT/throughput_vitb16.json" --profile "eclip, K=1" 2>&1 | grep -v "^WARNING" | tee "$OUT/throughput_vitb16.txt"
