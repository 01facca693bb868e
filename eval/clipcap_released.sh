#!/usr/bin/env bash
# ClipCap's released weights on COCO Karpathy test: convert each checkpoint and score it with ClipCap's
# decoding (beam 5, length-normalised, at most 67 tokens; the converted model stops at '.').
# Not runnable offline: needs the weights (Google Drive / the Hub mirrors), COCO val2014 and Java for
# pycocoevalcap. Published (Mokady et al. 2021, Table 1): MLP + fine-tuned GPT-2 B@4 32.15, METEOR 27.1,
# CIDEr 108.35, SPICE 20.12; transformer + frozen GPT-2 33.53 / 27.45 / 113.08 / 21.05.
set -euo pipefail
DATA=${DATA:-data/coco}        # val2014/ + dataset_coco.json, as eval/coco_karpathy.sh downloads them
WEIGHTS=${WEIGHTS:-weights}    # coco_weights.pt (MLP) and transformer_weights.pt (transformer mapper)
RUNS=${RUNS:-runs}
mkdir -p "$WEIGHTS" "$RUNS"
if [ ! -f "$WEIGHTS/coco_weights.pt" ]; then
  curl -L -o "$WEIGHTS/coco_weights.pt" \
    "https://huggingface.co/akhaliq/CLIP-prefix-captioning-COCO-weights/resolve/main/coco_weights.pt"
fi
captioner convert clipcap "$WEIGHTS/coco_weights.pt" --output "$RUNS/clipcap_coco_mlp"
# The transformer-mapper model is only on ClipCap's Google Drive (README of rmokady/CLIP_prefix_caption).
if [ -f "$WEIGHTS/transformer_weights.pt" ]; then
  captioner convert clipcap "$WEIGHTS/transformer_weights.pt" --output "$RUNS/clipcap_coco_transformer"
fi
for run in clipcap_coco_mlp clipcap_coco_transformer; do
  [ -d "$RUNS/$run" ] || continue
  captioner eval --model "$RUNS/$run" --data "$DATA/dataset_coco.json" --split test --spice \
    --strategy beam --num-beams 5 --length-penalty 1.0 --max-new-tokens 67 --output-dir "$RUNS/$run/eval_test"
done
