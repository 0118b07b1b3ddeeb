#!/usr/bin/env bash
# README's first command. On a fresh clone (CPU only, about 5 minutes on 2 cores):
#   1. set up: torch (CPU wheel), this package and its test/plot extras (tools/setup_env.sh);
#   2. pack the bundled preference set (examples/data, from The Devil's Dictionary) with adadpo-pack;
#   3. train the tiny GPT of examples/configs/tiny.yaml with AdaDPO, then with DPO:
#      torchrun --nproc-per-node 2, tensor parallelism 2, gloo on the CPU;
#   4. plot both runs' curves into one PNG and print the held-out reward accuracy of each.
#
# Environment: QUICKSTART_OUT (default runs/quickstart), PYTHON (default python3),
# QUICKSTART_SKIP_SETUP=1 to skip step 1 on a machine that is already set up.
# Extra arguments go to both training runs (e.g. --train-iters 200).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${QUICKSTART_OUT:-runs/quickstart}
PY=${PYTHON:-python3}
TARGET=0.8
SECONDS=0

if [ "${QUICKSTART_SKIP_SETUP:-0}" != 1 ]; then
  echo "== setting up (tools/setup_env.sh)"
  bash tools/setup_env.sh
fi
export TORCHDYNAMO_DISABLE=1  # no torch.compile here; saves seconds per process start
export OMP_NUM_THREADS=1      # one thread per process: two processes share two cores

# The console scripts, or their module forms when pip put them off PATH.
if command -v adadpo-pack >/dev/null; then PACK=(adadpo-pack); else PACK=("$PY" -m adadpo_megatron.data.pack_tool); fi
if command -v torchrun >/dev/null; then TORCHRUN=(torchrun); else TORCHRUN=("$PY" -m torch.distributed.run); fi

echo "== packing examples/data into $OUT/data ($SECONDS s)"
for split in train eval; do
  "${PACK[@]}" "examples/data/$split.jsonl" --output "$OUT/data/$split" \
    --tokenizer examples/data/tokenizer.model --pack-size 512 --strict --overwrite
done

for loss in adadpo dpo; do
  echo "== training with --preference-loss $loss ($SECONDS s)"
  rm -rf "${OUT:?}/$loss"
  "${TORCHRUN[@]}" --standalone --nproc-per-node 2 -m adadpo_megatron.train \
    --config examples/configs/tiny.yaml --preference-loss "$loss" \
    --data-path "$OUT/data/train" --eval-data-path "$OUT/data/eval" \
    --log-dir "$OUT/$loss" "$@"
done

echo "== plotting ($SECONDS s)"
"$PY" tools/plot_metrics.py "$OUT/adadpo" "$OUT/dpo" --output "$OUT/adadpo_vs_dpo.png" \
  --title "AdaDPO vs DPO: tiny GPT on The Devil's Dictionary (held-out: eval/)"

"$PY" - "$OUT" "$TARGET" "$SECONDS" <<'EOF'
import json
import sys
from pathlib import Path

out, target, seconds = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ok = True
print(f"\nquickstart done in {seconds} s")
for loss in ("adadpo", "dpo"):
    records = [json.loads(line) for line in (out / loss / "metrics.jsonl").open() if line.strip()]
    evals = [r for r in records if "eval/rewards/accuracies" in r]
    if not evals:
        print(f"  {loss}: no held-out evaluation in {out / loss / 'metrics.jsonl'}")
        ok = False
        continue
    last = evals[-1]
    acc = last["eval/rewards/accuracies"]
    ok &= acc > target
    print(f"  {loss:7s} held-out reward accuracy {acc:.3f} at step {last['step']} "
          f"(margin {last.get('eval/rewards/margins', float('nan')):.3f})  logs: {out / loss}")
print(f"  plot: {out / 'adadpo_vs_dpo.png'}")
if not ok:
    print(f"held-out reward accuracy did not exceed {target}: see the logs above")
    sys.exit(1)
EOF
