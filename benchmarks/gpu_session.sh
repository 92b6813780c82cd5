#!/usr/bin/env bash
# The checks of one lent GPU session, in one call (device time is scarce): the environment,
# the commands on CUDA (`eclip demo --quick`, then eval, eval-scenes, embed and serve on its model,
# each compared with the CPU), the trainer's CUDA path (ShopSynth, tiny preset, bf16, 60 steps)
# and the training throughput benchmark at ViT-B/16, 224 px, bf16, the largest batch that fits.
# Writes under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_session.sh
# SKIP_DEVICE=1 / SKIP_TRAINER=1 / SKIP_THROUGHPUT=1 leave a part out; DEVICE=cpu DEMO_ARGS="--steps
# 10 --products 120" runs the first part anywhere (a dry run of the script).
set -u
OUT=${OUT:-/tmp/eclip_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, open_clip, timm; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)"
ECLIP="python3 -m eclip_app.cli"
DEVICE=${DEVICE:-cuda}

if [ "${SKIP_DEVICE:-0}" != 1 ]; then
echo "== the commands on $DEVICE: demo --quick, eval, eval-scenes, embed, search, serve"
rm -rf /tmp/demo /tmp/scenes /tmp/emb /tmp/index
# shellcheck disable=SC2086
$ECLIP demo --quick --out /tmp/demo --no-progress --device "$DEVICE" ${DEMO_ARGS:-} 2>&1 \
    | grep -E "^\||report:|Error" | tee "$OUT/demo_$DEVICE.txt"
cp /tmp/demo/results.json "$OUT/demo_results_$DEVICE.json" 2>/dev/null
M=/tmp/demo/eclip/model
for dev in "$DEVICE" cpu; do
    $ECLIP eval --model $M --catalog /tmp/demo/data/heldout.jsonl --device "$dev" --json --no-progress > "$OUT/eval_$dev.json"
done
$ECLIP -q compose --catalog /tmp/demo/data/heldout.jsonl --out /tmp/scenes --scenes-per-product 1 --size 128 --no-progress
for dev in "$DEVICE" cpu; do
    $ECLIP eval-scenes --model $M --scenes /tmp/scenes/catalog.jsonl --catalog /tmp/demo/data/heldout.jsonl \
        --device "$dev" --json --no-progress > "$OUT/eval_scenes_$dev.json"
done
OUT="$OUT" DEVICE="$DEVICE" python3 - <<'PY'
import json, os
out, dev = os.environ["OUT"], os.environ["DEVICE"]
for name in ("eval", "eval_scenes"):
    a, b = (json.load(open(f"{out}/{name}_{d}.json")) for d in (dev, "cpu"))
    diff = max(abs(a[k] - b[k]) for k in b if isinstance(b[k], (int, float)) and b[k] == b[k])
    print(f"{name}: {len(b)} metrics, largest |{dev} - cpu| = {diff:.2e}; headline {dev}:",
          {k: round(a[k], 3) for k in a if k in ("classification_top1", "grounding_acc50", "scene_to_catalog_map10")})
PY
$ECLIP embed --model $M --catalog /tmp/demo/data/heldout.jsonl --out /tmp/emb --device "$DEVICE" --no-progress | tail -1
$ECLIP index --embeddings /tmp/emb --out /tmp/index | tail -1
$ECLIP search --model $M --index /tmp/index --text "red striped tee" -k 3 --ground --device "$DEVICE"
$ECLIP serve --model $M --index /tmp/index --device "$DEVICE" --port 8765 > "$OUT/serve_$DEVICE.log" 2>&1 &
SERVE=$!
for _ in $(seq 60); do curl -sf http://127.0.0.1:8765/health > "$OUT/serve_health_$DEVICE.json" && break; sleep 1; done
cat "$OUT/serve_health_$DEVICE.json"; echo
IMG=$(python3 -c "import json; print(json.loads(open('/tmp/demo/data/heldout.jsonl').readline())['images'][0]['path'])")
[ -f "$IMG" ] || IMG="/tmp/demo/data/$IMG"
curl -sf -F "text=red striped tee" -F "image=@$IMG" -F k=3 -F ground=1 http://127.0.0.1:8765/search \
    | python3 -c "import json, sys; r = json.load(sys.stdin); print('serve /search:', [(x['product_id'], round(x['score'], 3)) for x in r['results']], r['took_ms'], 'ms')"
kill "$SERVE"
fi
[ "${SKIP_TRAINER:-0}" = 1 ] && [ "${SKIP_THROUGHPUT:-0}" = 1 ] && exit 0
[ "${SKIP_TRAINER:-0}" = 1 ] || {

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
}

[ "${SKIP_THROUGHPUT:-0}" = 1 ] && exit 0
echo "== training throughput, ViT-B/16"
BATCH=${BATCH:-auto}  # 512 on an 80 GB H100 (768 runs out of memory with every row resident)
python3 benchmarks/train_throughput.py --model ViT-B-16 --precision bf16 --batch "$BATCH" \
    --steps 3 --rounds 5 --json "$OUT/throughput_vitb16.json" --profile "eclip, K=1" 2>&1 | grep -v "^WARNING" | tee "$OUT/throughput_vitb16.txt"
