#!/usr/bin/env bash
# `make demo-finetune`: from the `make demo` checkpoint (made first when missing), finetune caption stage 1 →
# stage 2 (SCST) and VQA with the recipes of configs/finetune on the synthetic finetuning TSVs of
# `ofa-preprocess sample`, evaluate each model on a held-out split with `ofa-eval run` before and after, and print
# a table of every metric before/after, next to the trivial baseline (ofa_scale/finetune/baselines.py: the most
# frequent training caption, the majority training answer). CPU-sized: the demo's small OFA, 64-px images,
# 2 processes (gloo).
# Variables (set by the Makefile): DEMO_DIR (the pretraining demo run), FT_DIR (this demo's runs), VENV,
# FT_IMAGES / FT_EVAL_IMAGES (training / held-out images), STAGE1_STEPS, STAGE2_STEPS, VQA_STEPS (update caps).
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-runs/demo}
FT_DIR=${FT_DIR:-runs/demo_finetune}
VENV=${VENV:-.venv}
FT_IMAGES=${FT_IMAGES:-192}
FT_EVAL_IMAGES=${FT_EVAL_IMAGES:-48}
STAGE1_STEPS=${STAGE1_STEPS:-150}
STAGE2_STEPS=${STAGE2_STEPS:-30}
VQA_STEPS=${VQA_STEPS:-150}
PY="$VENV/bin/python"
DATA="$FT_DIR/data"
TSV="$DATA/corpus/finetune"
# one thread per process: the two training ranks (and the loader workers) share two cores
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS="ignore::FutureWarning"

step() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

if [ ! -e "$DEMO_DIR/checkpoints/latest" ]; then
  step "no pretrained demo checkpoint in $DEMO_DIR: running make demo first"
  DEMO_DIR="$DEMO_DIR" VENV="$VENV" bash scripts/demo.sh
fi
if [ -e "$FT_DIR" ]; then
  step "removing the previous finetuning demo in $FT_DIR"
  rm -rf "$FT_DIR"
fi

step "1/6 finetuning TSVs: $FT_IMAGES training images, $FT_EVAL_IMAGES per held-out split (other scenes)"
"$PY" -m ofa_scale.cli.preprocess sample --out "$DATA/corpus" --rows 1 --seed 0 \
  --finetune-images "$FT_IMAGES" --finetune-eval-images "$FT_EVAL_IMAGES" | grep finetune/

step "2/6 shards (ofa-preprocess shards --format) and the VQA candidate answers"
convert() {  # FORMAT TSV-NAME SHARD-DIR-NAME
  "$PY" -m ofa_scale.cli.preprocess shards --format "$1" --input "$TSV/$2" --out "$DATA/$3" --no-progress | sed -n 1p
}
convert caption caption_stage1_train.tsv caption_stage1_train
convert caption caption_stage2_train.tsv caption_stage2_train
convert caption caption_val.tsv caption_val
convert caption caption_test.tsv caption_test
convert vqa vqa_train.tsv vqa_train
convert vqa vqa_val.tsv vqa_val
convert vqa vqa_test.tsv vqa_test
"$PY" -m ofa_scale.cli.preprocess vqa-answers --input "$TSV/vqa_train.tsv" --out "$DATA/vqa_answers.txt"

# The recipes keep OFA's values; these overrides shrink them to the demo's model and to two CPU cores, and
# validate a few held-out rows often, so the best pointer has something to choose from. The cross-entropy runs
# also raise the learning rate (OFA's 1e-5 / 5e-5 move a model this small by little in a hundred updates); SCST
# keeps OFA's 1e-5, as larger steps on 8 images x 5 hypotheses per update made the demo's CIDEr worse.
MODEL=(--set model.arch=ofa_tiny --set model.overrides.d_model=128 --set model.overrides.ffn_dim=256
       --set model.overrides.heads=4 --set model.overrides.encoder_layers=2 --set model.overrides.decoder_layers=2
       --set data.tokenizer.kind=sentencepiece --set "data.tokenizer.path=$DEMO_DIR/data/tokenizer"
       --set task.image_size=64 --set precision=fp32)
TRAIN=(--set train.global_batch_size=8 --set train.micro_batch_size=2 --set train.log_interval=10
       --set train.ckpt_interval=50 --set data.num_workers=1 --set task.valid_interval=50 --set task.valid_limit=24
       --set logging.experiment=ofa-scale-demo-finetune)
CAPTION_DATA=(--set "data.valid=$DATA/caption_val")
VQA_TASK=(--set "task.answers=$DATA/vqa_answers.txt")

train() {  # RECIPE RUN-NAME ARGS...
  local recipe=$1 run=$2
  shift 2
  "$VENV/bin/deepspeed" --num_gpus 2 --module ofa_scale.train --config "configs/finetune/$recipe.yaml" \
    --run-dir "$FT_DIR/$run" "${MODEL[@]}" "${TRAIN[@]}" "$@" \
    2>&1 | { grep --line-buffered -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^DeepSpeed deepspeed.ops|mlflow.store.db.utils' || true; }
  test -e "$FT_DIR/$run/checkpoints/latest" || { echo "error: $recipe wrote no checkpoint in $FT_DIR/$run" >&2; exit 1; }
}
baseline() {  # RECIPE TRAIN-SHARDS TEST-SHARDS OUT ARGS...: a constant prediction, scored like ofa-eval run
  local recipe=$1 train=$2 shards=$3 out=$4
  shift 4
  mkdir -p "$FT_DIR/eval/$out"
  "$PY" -m ofa_scale.finetune.baselines --config "configs/finetune/$recipe.yaml" --train "$DATA/$train" \
    --data "$DATA/$shards" --out "$FT_DIR/eval/$out/metrics.json" "${MODEL[@]}" "$@"
}
evaluate() {  # RECIPE CHECKPOINT SHARDS OUT ARGS...
  local recipe=$1 ckpt=$2 shards=$3 out=$4
  shift 4
  "$PY" -m ofa_scale.cli.evaluate run --config "configs/finetune/$recipe.yaml" --checkpoint "$ckpt" \
    --data "$DATA/$shards" --out "$FT_DIR/eval/$out" "${MODEL[@]}" "$@"
}

step "3/6 before finetuning: the trivial baselines and the pretrained demo model on the held-out test splits"
baseline caption_stage1_base caption_stage1_train caption_test caption_baseline
baseline vqa_base vqa_train vqa_test vqa_baseline "${VQA_TASK[@]}"
evaluate caption_stage1_base "$DEMO_DIR" caption_test caption_pretrained
evaluate vqa_base "$DEMO_DIR" vqa_test vqa_pretrained "${VQA_TASK[@]}"

step "4/6 caption stage 1 (cross entropy, drop-worst, frozen embeddings): at most $STAGE1_STEPS updates"
train caption_stage1_base caption_stage1 "${CAPTION_DATA[@]}" --set "data.train=$DATA/caption_stage1_train" \
  --set "model.pretrained=$DEMO_DIR" --set train.steps="$STAGE1_STEPS" --set optim.lr=5e-4 \
  --set objectives.drop_worst_after=$(( STAGE1_STEPS / 2 ))
evaluate caption_stage1_base "$FT_DIR/caption_stage1" caption_test caption_stage1

step "5/6 caption stage 2 (SCST, CIDEr-D reward) from stage 1: at most $STAGE2_STEPS updates"
train caption_stage2_base caption_stage2 "${CAPTION_DATA[@]}" --set "data.train=$DATA/caption_stage2_train" \
  --set "model.pretrained=$FT_DIR/caption_stage1" --set train.steps="$STAGE2_STEPS"
evaluate caption_stage2_base "$FT_DIR/caption_stage2" caption_test caption_stage2

step "6/6 VQA (prev_output prompt, answer trie, EMA): at most $VQA_STEPS updates"
# OFA's EMA decay 0.9999 averages over ~10,000 updates; over the demo's ~150 it would keep the pretrained
# weights, so the demo uses 0.95 (the EMA weights are still what validation and evaluation use).
train vqa_base vqa "${VQA_TASK[@]}" --set "data.train=$DATA/vqa_train" --set "data.valid=$DATA/vqa_val" \
  --set "model.pretrained=$DEMO_DIR" --set train.steps="$VQA_STEPS" --set optim.lr=5e-4 --set train.ema_decay=0.95
evaluate vqa_base "$FT_DIR/vqa" vqa_test vqa_finetuned "${VQA_TASK[@]}"

step "held-out test metrics before and after finetuning ($(( $(date +%s) - start )) s in all)"
"$PY" - "$FT_DIR/eval" <<'EOF'
import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
rows = [("caption", ("bleu4", "meteor", "rouge_l", "cider"),
         ("caption_baseline", "caption_pretrained", "caption_stage1", "caption_stage2")),
        ("vqa", ("vqa_score",), ("vqa_baseline", "vqa_pretrained", "vqa_finetuned"))]
# columns: the trivial baseline (a constant caption / answer), the pretrained demo model, after cross-entropy
# finetuning (caption stage 1, VQA), after SCST (stage 2)
print(f"{'task':8} {'metric':10} {'baseline':>9} {'pretrained':>11} {'finetuned':>10} {'+ SCST':>8}")
for task, metrics, runs in rows:
    values = [json.loads((root / r / "metrics.json").read_text()) for r in runs]
    values = [v.get("metrics", v) for v in values]  # the numbers, whether at the top level or under "metrics"
    for m in metrics:
        cells = [f"{v[m]:.3f}" if isinstance(v.get(m), (int, float)) else "-" for v in values]
        cells += [""] * (4 - len(cells))  # VQA has one finetuning stage
        print(f"{task:8} {m:10} {cells[0]:>9} {cells[1]:>11} {cells[2]:>10} {cells[3]:>8}")
print(f"\nresults.json / metrics.json per model: {root}/<model>/; runs, metrics.jsonl and mlflow.db: {root.parent}/")
EOF
