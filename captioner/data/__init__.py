"""Caption sets and the tables around them.

A caption set is a list of `CaptionExample` (item id, image and/or audio path, reference captions).
Readers report problem rows with file and line, skip them and count them (`ReadReport`); `strict=True`
makes them errors. What lives where:

- examples.py   CaptionExample, ReadReport, input limits, caption cleaning, path containment
- columns.py    every list of column names that is auto-detected (image, audio, caption, id, key)
- tables.py     the one CSV/TSV/JSONL table reader (FILE:LINE problems) and JSON documents
- caption_tables.py  CSV/TSV/JSONL caption tables and the row logic imagefolder shares
- folders.py    the one folder walker, IMAGE/AUDIO_EXTENSIONS, collect_images/collect_audio, imagefolder
- coco.py       COCO captions and Karpathy split JSON
- audio_sets.py Clotho and AudioCaps CSVs
- hf.py         Hugging Face `datasets` datasets (save_to_disk folders, data files, hf:NAME)
- load.py       load_caption_set and load_references: the reader for a path
- predictions.py  predictions for scoring, input tables for captioning
"""

from captioner.data.audio_sets import read_audiocaps, read_clotho
from captioner.data.caption_tables import read_caption_table
from captioner.data.coco import KARPATHY_SPLITS, read_coco_captions, read_karpathy
from captioner.data.examples import (MAX_CAPTION_CHARS, MAX_FILE_BYTES, MAX_NAME_CHARS, MAX_PATH_BYTES, MAX_REFERENCES,
                                     CaptionExample, ReadReport)
from captioner.data.folders import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, collect_audio, collect_images, read_imagefolder
from captioner.data.hf import DEFAULT_HF_IMAGE_CACHE, is_saved_hf_dataset, read_hf_dataset
from captioner.data.load import load_caption_set, load_references
from captioner.data.predictions import match_prediction_ids, read_input_table, read_predictions
from captioner.errors import DataError, ImageError
from captioner.inputs.image import load_image  # the data layer's image reader

__all__ = [
    "AUDIO_EXTENSIONS", "DEFAULT_HF_IMAGE_CACHE", "IMAGE_EXTENSIONS", "KARPATHY_SPLITS", "MAX_CAPTION_CHARS",
    "MAX_FILE_BYTES", "MAX_NAME_CHARS", "MAX_PATH_BYTES", "MAX_REFERENCES", "CaptionExample", "DataError",
    "ImageError", "ReadReport", "collect_audio", "collect_images", "is_saved_hf_dataset", "load_caption_set",
    "load_image", "load_references", "match_prediction_ids", "read_audiocaps", "read_caption_table",
    "read_clotho", "read_coco_captions", "read_hf_dataset", "read_imagefolder", "read_input_table",
    "read_karpathy", "read_predictions",
]
