#!/usr/bin/env bash
# Flickr30k, Karpathy split. The images come from the Flickr30k request form
# (https://shannon.cs.illinois.edu/DenotationGraph/); put them in $DATA/flickr30k-images.
set -euo pipefail
DATA=${DATA:-data/flickr30k}
RUNS=${RUNS:-runs}
if [ ! -f "$DATA/dataset_flickr30k.json" ]; then
  curl -L -o "$DATA/caption_datasets.zip" "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
  unzip -q -o "$DATA/caption_datasets.zip" dataset_flickr30k.json -d "$DATA"
fi
# Karpathy's Flickr30k file has no filepath: images resolve as $DATA/flickr30k-images/<filename>.
captioner train --data "$DATA/dataset_flickr30k.json" --image-root "$DATA/flickr30k-images" \
  --train-split train --val-split val --output-dir "$RUNS/flickr30k_mlp" --clip-model ViT-B-32 \
  --clip-pretrained openai --lm gpt2 --mapper mlp --prefix-length 10 --finetune-lm --epochs 10 --lr 2e-5
captioner eval --model "$RUNS/flickr30k_mlp/best" --data "$DATA/dataset_flickr30k.json" \
  --image-root "$DATA/flickr30k-images" --split test --strategy beam --num-beams 5 \
  --output-dir "$RUNS/flickr30k_mlp/eval_test"
