#!/usr/bin/env bash
# Clotho v2.1 audio captioning: train on development, validate on validation, score the evaluation
# split (1,045 clips x 5 captions). Needs internet for the download and the pretrained weights, and 7z.
set -euo pipefail
DATA=${DATA:-data/clotho}
RUNS=${RUNS:-runs}
RECORD=https://zenodo.org/records/4783391/files  # Clotho v2.1 (Drossos et al. 2020)
mkdir -p "$DATA"

# 1. Download (about 6.5 GB): audio archives (they extract to development/, validation/, evaluation/)
#    and the caption CSVs (file_name,caption_1..caption_5), which our Clotho reader finds next to them.
for split in development validation evaluation; do
  [ -f "$DATA/clotho_captions_$split.csv" ] || curl -L -o "$DATA/clotho_captions_$split.csv" \
    "$RECORD/clotho_captions_$split.csv?download=1"
  if [ ! -d "$DATA/$split" ]; then
    curl -L -o "$DATA/clotho_audio_$split.7z" "$RECORD/clotho_audio_$split.7z?download=1"
    7z x -o"$DATA" "$DATA/clotho_audio_$split.7z" && rm "$DATA/clotho_audio_$split.7z"
  fi
done

# 2. Train an audio-only captioner: CLAP (laion/clap-htsat-unfused, frozen; clips longer than its 10 s
#    window are cut to the centred 10 s) -> transformer mapper -> GPT-2 (fine-tuned).
captioner train --data "$DATA/clotho_captions_development.csv" --val-split none \
  --output-dir "$RUNS/clotho" --modalities audio --audio-encoder clap --audio-model laion/clap-htsat-unfused \
  --lm gpt2 --finetune-lm --mapper transformer --prefix-length 10 --clip-length 10 --mapper-layers 4 \
  --epochs 20 --batch-size 32 --lr 2e-5 --warmup-steps 1000 --feature-cache "$RUNS/feature_cache"
captioner eval --model "$RUNS/clotho/last" --data "$DATA/clotho_captions_validation.csv" \
  --strategy beam --num-beams 5 --output-dir "$RUNS/clotho/eval_validation"

# 3. Evaluation split, beam 5. SPIDEr = (CIDEr + SPICE) / 2 is printed as the headline once the
#    Stanford CoreNLP jars for SPICE are installed (pycocoevalcap's get_stanford_models); CIDEr otherwise.
captioner eval --model "$RUNS/clotho/last" --data "$DATA/clotho_captions_evaluation.csv" \
  --strategy beam --num-beams 5 --output-dir "$RUNS/clotho/eval_evaluation"
