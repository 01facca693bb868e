#!/usr/bin/env bash
# nocaps validation: a COCO-trained captioner (e.g. from coco_karpathy.sh) on novel objects.
set -euo pipefail
DATA=${DATA:-data/nocaps}
MODEL=${MODEL:-runs/coco_transformer/best}
mkdir -p "$DATA/images"
[ -f "$DATA/nocaps_val_4500_captions.json" ] || \
  curl -L -o "$DATA/nocaps_val_4500_captions.json" "https://s3.amazonaws.com/nocaps/nocaps_val_4500_captions.json"
# Images: each entry of "images" has a coco_url; download them under their file_name.
python - "$DATA" <<'PY'
import json, os, sys, urllib.request
data = sys.argv[1]
for im in json.load(open(f"{data}/nocaps_val_4500_captions.json"))["images"]:
    dst = os.path.join(data, "images", im["file_name"])
    if not os.path.exists(dst):
        urllib.request.urlretrieve(im["coco_url"], dst)
PY
captioner eval --model "$MODEL" --data "$DATA/nocaps_val_4500_captions.json" --image-root "$DATA/images" \
  --split val --strategy beam --num-beams 5 --output-dir "$DATA/eval_val"
