"""Caption sets: imagefolder, COCO / Karpathy JSON, CSV/TSV/JSONL tables, Clotho / AudioCaps, Hugging
Face datasets -> `CaptionExample` rows; references and predictions for scoring; input tables.
"""
