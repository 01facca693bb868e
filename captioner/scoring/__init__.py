"""Scoring captions: metrics.py (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr as COCO computes them),
clipscore.py (CLIPScore / RefCLIPScore), report.py (self-contained HTML report), evaluate.py (the
evaluation workflow: caption + score a set, CLIPScore model choice, per-input ablation, output files).
"""
