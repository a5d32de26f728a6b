#!/usr/bin/env bash
# `make demo`: sample corpus → shards → SentencePiece tokenizer → 2-process CPU pretraining (gloo, ZeRO-3) of a
# small OFA with all eight objectives → a table of first vs last loss per objective, the mlflow location and the
# checkpoint path. Runs in a few minutes on 2 CPU cores. Variables (set by the Makefile): DEMO_DIR, DEMO_ROWS, VENV.
set -euo pipefail

DEMO_DIR=${DEMO_DIR:-runs/demo}
DEMO_ROWS=${DEMO_ROWS:-2000}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
DATA="$DEMO_DIR/data"
# one thread per process: the two training ranks (and the loader workers) share two cores
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS="ignore::FutureWarning"

step() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

if [ -e "$DEMO_DIR" ]; then
  step "removing the previous demo run in $DEMO_DIR"
  rm -rf "$DEMO_DIR"
fi

step "1/5 sample corpus: $DEMO_ROWS image-text rows plus text, image-infilling and detection rows"
# pretraining only: no text-only, OCR or text-to-image finetuning files (make demo-finetune writes its own)
"$PY" -m ofa_scale.cli.preprocess sample --out "$DATA/corpus" --rows "$DEMO_ROWS" --text-rows 0 --ocr-font none \
  --image-gen-rows 0

step "2/5 shards (webdataset) with manifest and rejects"
"$PY" -m ofa_scale.cli.preprocess shards \
  --vl "$DATA/corpus/vision_language_examples.tsv" --text "$DATA/corpus/text_examples.tsv" \
  --image "$DATA/corpus/image_examples.tsv" --detection "$DATA/corpus/detection_examples.tsv" \
  --negatives "$DATA/corpus/negative_sample" --out "$DATA/shards" --workers 2 --no-progress

step "3/5 SentencePiece tokenizer trained on the corpus text (plus <mask>, 8192 <code>, 1000 <bin> tokens)"
"$PY" -m ofa_scale.cli.preprocess train-tokenizer \
  --input "$DATA/corpus/vision_language_examples.tsv" "$DATA/corpus/text_examples.tsv" \
  --vocab-size 2000 --soft-vocab-limit --out "$DATA/tokenizer"

step "4/5 pretraining: deepspeed --num_gpus 2 (CPU, gloo), ZeRO-3, all eight objectives in every batch"
"$VENV/bin/deepspeed" --num_gpus 2 --module ofa_scale.train \
  --config configs/demo.yaml --run-dir "$DEMO_DIR" \
  --set "data.root=$DATA/shards" --set "data.tokenizer.path=$DATA/tokenizer" \
  2>&1 | { grep --line-buffered -v -E '^\[[0-9-]+ [0-9:,]+\] \[(INFO|WARNING)\]|^DeepSpeed deepspeed.ops|mlflow.store.db.utils' || true; }

step "training summary ($(( $(date +%s) - start )) s so far)"
"$PY" -m ofa_scale.training.summary "$DEMO_DIR" --window 15

step "5/5 evaluation: generate on held-out rows (a fresh seed) and score captions, VQA and grounding"
"$PY" -m ofa_scale.cli.preprocess sample --out "$DATA/heldout_corpus" --rows 120 --seed 99 --finetune-images 0 \
  --text-rows 0 --ocr-font none --image-gen-rows 0
# VQA answers come from a candidate file built from training questions only (never from the evaluated references)
"$PY" -m ofa_scale.cli.preprocess vqa-answers --input "$DATA/corpus/finetune/vqa_train.tsv" --out "$DATA/vqa_answers.txt"
"$PY" -m ofa_scale.cli.preprocess shards --vl "$DATA/heldout_corpus/vision_language_examples.tsv" \
  --out "$DATA/heldout_shards" --no-progress
# greedy (--beam 1): after a few minutes of training, beams of 5 prefer the short yes/no answers of the ITM
# task over a full caption (higher mean log-prob per token); OFA's beam-5 settings suit trained models.
"$PY" -m ofa_scale.cli.evaluate generate --checkpoint "$DEMO_DIR" --data "$DATA/heldout_shards" --beam 1 \
  --tasks caption,vqa,grounding --limit 24 --answers "$DATA/vqa_answers.txt" --out "$DEMO_DIR/eval"

step "pictures of the run: loss per objective, lr, grad norm, throughput, memory (open report.md)"
"$PY" -m ofa_scale.cli.evaluate report "$DEMO_DIR"

step "done in $(( $(date +%s) - start )) s: run in $DEMO_DIR, evaluation tables in $DEMO_DIR/eval"
