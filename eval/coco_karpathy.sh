#!/usr/bin/env bash
# COCO captions, Karpathy split. Reproduces ClipCap's two configurations (see README.md for the
# published numbers), then continues the MLP one with self-critical training (SCST, CIDEr-D reward):
# target above ClipCap's 113 CIDEr with ViT-B/32 + GPT-2 (not yet run: no COCO or GPU where it was
# written). Needs internet for the downloads and the pretrained weights.
set -euo pipefail
DATA=${DATA:-data/coco}
RUNS=${RUNS:-runs}
mkdir -p "$DATA"

# 1. Download (about 19 GB): COCO 2014 images and the Karpathy split file.
if [ ! -d "$DATA/val2014" ]; then
  for z in train2014 val2014; do
    curl -L -o "$DATA/$z.zip" "http://images.cocodataset.org/zips/$z.zip"
    unzip -q "$DATA/$z.zip" -d "$DATA" && rm "$DATA/$z.zip"
  done
fi
if [ ! -f "$DATA/dataset_coco.json" ]; then
  curl -L -o "$DATA/caption_datasets.zip" "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
  unzip -q -o "$DATA/caption_datasets.zip" dataset_coco.json -d "$DATA"
fi

# 2. Train. (a) transformer mapper, frozen GPT-2; (b) MLP mapper, fine-tuned GPT-2.
captioner train --data "$DATA/dataset_coco.json" --train-split train+restval --val-split val \
  --output-dir "$RUNS/coco_transformer" --clip-model ViT-B-32 --clip-pretrained openai --lm gpt2 \
  --mapper transformer --prefix-length 10 --clip-length 10 --mapper-layers 8 --no-finetune-lm \
  --epochs 10 --batch-size 40 --lr 2e-5 --warmup-steps 5000
captioner train --data "$DATA/dataset_coco.json" --train-split train+restval --val-split val \
  --output-dir "$RUNS/coco_mlp" --clip-model ViT-B-32 --clip-pretrained openai --lm gpt2 \
  --mapper mlp --prefix-length 10 --finetune-lm --epochs 10 --batch-size 40 --lr 2e-5 --warmup-steps 5000

# 3. SCST from the cross-entropy MLP model: 5 samples per image (250 captions = 50 images per step), the
#    mean of the other samples as baseline, lr 1e-5, 3 epochs; validation CIDEr on 1,000 val images every
#    2,000 steps decides best/.
captioner train --scst --init-from "$RUNS/coco_mlp/best" --data "$DATA/dataset_coco.json" \
  --train-split train+restval --val-split val --output-dir "$RUNS/coco_mlp_scst" \
  --scst-samples 5 --batch-size 250 --lr 1e-5 --epochs 3 --warmup-steps 0 \
  --val-every 2000 --val-images 1000 --mixed-precision bf16

# 4. Evaluate on the 5,000 Karpathy test images with beam 5 (add --spice once CoreNLP is installed).
for run in coco_transformer coco_mlp coco_mlp_scst; do
  captioner eval --model "$RUNS/$run/best" --data "$DATA/dataset_coco.json" --split test \
    --strategy beam --num-beams 5 --max-new-tokens 30 --output-dir "$RUNS/$run/eval_test"
done
