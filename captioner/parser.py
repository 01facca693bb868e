"""The command-line parser: every command's arguments (config fields become flags through flags.py).

Parsing only: cli.py maps each command to its handler, builds configs, calls the library and prints.
"""

from __future__ import annotations

import argparse

from captioner.config import DecodeConfig, ModelConfig, nonnegative_int, positive_int
from captioner.errors import CaptionerError, FileSystemError
from captioner.flags import _parse_json_arg, add_dataclass_flags, parse_list as _parse_list
from captioner.inputs.image import MAX_PIXELS

# 1 is "some inputs failed" (the rest were done); errors that stop a command carry their own code.
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_OS = 0, 1, CaptionerError.exit_code, FileSystemError.exit_code
EXIT_CODES = (f"exit codes: {EXIT_OK} success; {EXIT_FAILURES} some inputs failed (the rest were done); "
              f"{EXIT_USAGE} usage, configuration, data or model error; {EXIT_OS} file system error (missing "
              "folder, permission, disk full). Errors are one line on stderr.")

DATA_FIELDS = ("image_root", "image_column", "caption_column", "audio_column", "audio_root", "strict",
               "allow_outside_paths")


def add_captioning_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that caption with a saved captioner."""
    p.add_argument("--model", required=True, help="directory of a saved captioner (config.json + model.safetensors), "
                   "a known name (clipcap-coco, clipcap-conceptual: downloaded and converted once) or a Hugging Face "
                   "Hub repo user/name[@revision] (the local directory wins when both exist)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default: 32)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="precision of every part (default: float32; bfloat16 is much faster on recent GPUs)")
    p.add_argument("--quantize", choices=["int8"], help="CPU only: int8 dynamic quantization of the LM's and "
                   "mappers' linear layers (model/quantize.py; see the README for speed and agreement with float32)")
    add_dataclass_flags(p, DecodeConfig, title="decoding")


def build_parser() -> argparse.ArgumentParser:
    from captioner.config import TrainConfig
    from captioner.demo.tiny import TINY_TOKENIZER_VOCAB
    from captioner.train.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="captioner",
        description="Image and audio captioning: frozen CLIP (and CLAP/Whisper) encoders -> trainable prefix "
                    "mappers -> causal LM (GPT-2).",
        epilog=f"Run 'captioner COMMAND --help' for the options of each command. {EXIT_CODES}",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("caption", help="caption images and/or sounds with a saved captioner",
                       description="Caption image files, folders (recursive) and globs, sound files with --audio, "
                                   "or image+sound pairs (both given: paired in order). Prints "
                                   "path<TAB>caption, or writes JSONL/CSV with --output. Unreadable inputs are "
                                   "listed at the end and make the exit code 1.")
    p.add_argument("images", nargs="*", help="image files, folders or glob patterns (quote globs)")
    p.add_argument("--audio", nargs="+", metavar="AUDIO",
                   help="sound files (wav, flac, ogg, mp3, ...), folders or globs, for a captioner trained with "
                        "audio; with images too, the i-th sound goes with the i-th image")
    p.add_argument("--table", help="a CSV/TSV/JSONL table of inputs: an image column (image, file_name, path, "
                                   "...: the names every table takes), an audio column (audio, audio_file or "
                                   "audio_path), or both; paths relative to the table")
    p.add_argument("--output", "-o", help="write results to this file (.jsonl or .csv) instead of stdout")
    p.add_argument("--format", choices=["jsonl", "csv"], help="output format (default: from the file extension)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: keep the results already "
                                                         "in --output and caption only the other images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--errors", help="where failures go (JSONL; default: OUTPUT.errors.jsonl)")
    p.add_argument("--max-pixels", type=nonnegative_int, default=MAX_PIXELS,
                   help=f"refuse images of more pixels than this, before decoding (decompression-bomb guard; "
                        f"0: no limit; default: {MAX_PIXELS})")
    g = p.add_argument_group("sharded captioning of large collections (inputs: folders, files, WebDataset "
                             "tars with brace patterns like 'shards/{00000..00999}.tar', parquet/CSV)")
    g.add_argument("--output-dir", help="sharded mode: one output file per shard in DIR/shards, merged into "
                                        "DIR/captions.jsonl; under torchrun/accelerate launch each process takes "
                                        "its share of the shards; rerunning continues where it stopped")
    g.add_argument("--files-per-shard", type=positive_int, default=1000,
                   help="loose image files per shard (default: 1000)")
    p.add_argument("--num-workers", type=nonnegative_int, default=None, help="file decoding workers per process, "
                   "reading the next batches while the model captions this one (default: one per CPU this process "
                   "may use, less one, at most 4)")
    p.add_argument("--jpeg-on-device", action=argparse.BooleanOptionalAction, default=None,
                   help="workers only read plain JPEG files; they are decoded and resized on the device in batches "
                        "(nvjpeg on CUDA; pixels may differ from PIL's by a level or two). "
                        "Default: on with CUDA")
    g.add_argument("--write-shards", choices=["txt", "json"], help="also write WebDataset tars with a caption "
                                                                  "member per key to DIR/wds")
    p.add_argument("--clip-score-model", help="--rerank clip: open_clip model (name or .json architecture) that scores "
                                              "the candidates (default: the captioner's own CLIP when it is a named "
                                              "pretrained one)")
    p.add_argument("--clip-score-pretrained", default="openai", help="pretrained tag or file for --clip-score-model, "
                                                                       "or none for random weights (default: openai)")
    add_captioning_flags(p)

    p = sub.add_parser("bench", add_help=False, help="speed benchmark (eval/bench.py): decoding vs ClipCap's way and HF generate",
                       description="Runs eval/bench.py from the source checkout; arguments after 'bench' go to it "
                                   "(e.g. captioner bench --batch-sizes 1,32 --skip-train; --help: its options).")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for eval/bench.py")

    p = sub.add_parser("merge", help="merge the per-shard outputs of a sharded captioning run",
                       description="Write DIR/captions.jsonl and DIR/index.json from DIR/shards once every shard "
                                   "is done (idempotent).")
    p.add_argument("output_dir", help="the --output-dir of the captioning run")

    p = sub.add_parser("eval", help="caption a split and score it (BLEU, METEOR, ROUGE-L, CIDEr, CLIPScore)",
                       description="Caption every image of a caption set split with a saved captioner and "
                                   "score the captions as the COCO caption evaluation does (pycocoevalcap, PTB "
                                   "tokenizer), plus CLIPScore/RefCLIPScore. Writes scores.json, "
                                   "predictions.json and an HTML report with --output-dir.")
    p.add_argument("--data", required=True, help="caption set: imagefolder directory, COCO captions JSON, "
                                                 "Karpathy split JSON, a CSV/TSV/JSONL table, or a Hugging Face "
                                                 "dataset (save_to_disk folder, parquet, hf:NAME)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    add_dataclass_flags(p, TrainConfig, only=DATA_FIELDS, title="caption set columns and folders")
    p.add_argument("--modalities", type=_parse_list, metavar="A,B",
                   help="inputs to use, e.g. image or audio, to score what a two-input captioner says from one "
                        "input alone (default: every input the captioner takes)")
    p.add_argument("--ablate", action="store_true", help="two-input captioners: also caption from each input "
                                                         "alone and print the scores side by side")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N items")
    p.add_argument("--num-workers", type=nonnegative_int, default=None,
                   help="file decoding workers (default: one per CPU this process may use, less one, at most 4)")
    p.add_argument("--output-dir", help="write scores.json, predictions.json and report.html here")
    p.add_argument("--spice", action="store_true", help="also compute SPICE (needs Stanford CoreNLP jars)")
    p.add_argument("--clip-score-model", help="open_clip model for CLIPScore and --rerank clip (default: the "
                                              "captioner's own CLIP when it is a named pretrained one)")
    p.add_argument("--clip-score-pretrained", default="openai", help="pretrained tag or file for "
                                                                       "--clip-score-model, or none for random "
                                                                       "weights (default: openai)")
    p.add_argument("--no-clip-score", action="store_true", help="skip CLIPScore")
    add_captioning_flags(p)

    p = sub.add_parser("score", help="score any system's captions against references",
                       description="Score predicted captions against references with the COCO caption "
                                   "metrics. Predictions: COCO results JSON [{image_id, caption}], JSONL or CSV "
                                   "(our caption output works as is). References: COCO captions JSON, Karpathy "
                                   "split JSON, an imagefolder directory, or a CSV/TSV/JSONL table.")
    p.add_argument("--predictions", required=True, help="predicted captions file")
    p.add_argument("--references", required=True, help="reference captions file or imagefolder directory")
    p.add_argument("--split", default="test", help="split of a Karpathy file or imagefolder (default: test)")
    p.add_argument("--output", "-o", help="write corpus and per-image scores to this JSON file")
    p.add_argument("--spice", action="store_true", help="also compute SPICE (needs Stanford CoreNLP jars)")
    p.add_argument("--rank", type=int, default=0, help="with several captions per item (caption --num-captions): "
                                                       "score this rank, 0 being the best (default: 0)")

    p = sub.add_parser("push", help="upload a saved captioner with a model card to the Hugging Face Hub",
                       description="Upload config.json, model.safetensors, the tokenizer files and a generated "
                                   "model card (README.md: Hub metadata, the eval scores.json and train_config.json "
                                   "found in the run, intended use, limitations) to a Hub model repo, created if "
                                   "needed. Needs internet and a token (hf auth login or HF_TOKEN).")
    p.add_argument("run_dir", help="a saved captioner directory, or a training run directory (its best/ or last/)")
    p.add_argument("repo_id", help="Hub repo, user/name or org/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if needed; default: main)")
    p.add_argument("--scores", help="scores.json of a captioner eval run for the card (default: scores.json or "
                                    "eval/scores.json in the model or run directory)")
    p.add_argument("--card-only", metavar="PATH", help="only write the model card to PATH (offline; nothing uploaded)")

    p = sub.add_parser("train", help="train a captioner on a caption set",
                       description="Train the mappers (and optionally the LM) on a caption set of images, sounds or both. "
                                   "Flags override values from --config, which override a --preset.")
    p.add_argument("--config", help="JSON or YAML file with TrainConfig fields (and a nested 'model' object)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe; " + "; ".join(
        f"{k}: {v} (--tokenizer DIR uses a saved one)" for k, v in PRESETS.items()))
    add_dataclass_flags(p, TrainConfig, title="training")
    add_dataclass_flags(p, ModelConfig, title="model")

    p = sub.add_parser("convert", help="convert a foreign checkpoint into a captioner directory",
                       description="Convert a checkpoint of another project into a captioner directory "
                                   "(config.json + model.safetensors + tokenizer) that every command loads.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    c = kinds.add_parser("clipcap", help="a ClipCap .pt (coco_weights.pt, conceptual_weights.pt, transformer model)",
                         description="ClipCap (rmokady/CLIP_prefix_caption) weights; read as plain tensors, never "
                                     "unpickled objects. The converted model stops captions at the first '.', as "
                                     "ClipCap does.")
    c.add_argument("checkpoint", metavar="CKPT", help="ClipCap .pt file")
    c.add_argument("--output", "-o", required=True, help="directory to write")
    c.add_argument("--layout", choices=("mlp", "transformer"), help="mapper layout (default: detected from the keys)")
    c.add_argument("--tokenizer", default="gpt2", help="GPT-2 tokenizer name or directory (default: gpt2)")
    c.add_argument("--clip-pretrained", default="openai",
                   help="open_clip pretrained tag of the image encoder, or none for random weights (default: openai)")
    c.add_argument("--clip-config", type=_parse_json_arg, help="inline open_clip config (JSON or a JSON file) of a custom image encoder "
                   "(with --clip-pretrained none: random, saved with the model)")
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the captions of a caption set",
                       description="Train a GPT-2-style byte-level BPE tokenizer on one split's captions and save "
                                   "it (save_pretrained files), for --tokenizer; fully offline.")
    p.add_argument("--data", required=True, help="caption set (as for train)")
    p.add_argument("--split", default="train", help="split whose captions are used (default: train)")
    p.add_argument("--output", "-o", required=True, help="directory to save the tokenizer in")
    p.add_argument("--vocab-size", type=positive_int, default=TINY_TOKENIZER_VOCAB,
                   help=f"tokens in the vocabulary, at most (default: {TINY_TOKENIZER_VOCAB})")
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --output")
    add_dataclass_flags(p, TrainConfig, only=DATA_FIELDS, title="caption set columns and folders")

    from captioner.serve.settings import ServeConfig

    p = sub.add_parser("serve", help="HTTP service with dynamic batching and a web page (needs the serve extra)",
                       description="Serve a captioner over HTTP (FastAPI + uvicorn): POST /v1/caption (multipart "
                                   "files or JSON base64, decoding options per request), the web page at /, "
                                   "/healthz, /readyz, /metrics (Prometheus), /docs. Requests that arrive together "
                                   "share one model call. SIGTERM answers the requests in flight, then exits. "
                                   "Decoding flags set the options of requests that give none.")
    p.add_argument("--model", required=True, help="directory of a saved captioner, a known name or a Hub repo (as "
                                                  "for caption)")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="precision of every part (default: "
                                                                                 "float32)")
    add_dataclass_flags(p, ServeConfig, title="server")
    add_dataclass_flags(p, DecodeConfig, title="decoding (defaults of requests)")

    p = sub.add_parser("demo", help="offline demo: generate shapes, train a tiny captioner, caption and score",
                       description="Runs the whole job offline on generated data: a shapes caption set, a tiny "
                                   "open_clip encoder, a tiny GPT-2 with a tokenizer trained on the captions, "
                                   "training on CPU, captions for the test split, BLEU-4/CIDEr and an HTML "
                                   "gallery.")
    p.add_argument("--output-dir", default="demo_out", help="where data, model and report go (default: demo_out, "
                                                            "or demo_audio_out with --audio)")
    p.add_argument("--audio", action="store_true", help="the image + sound variant: scenes whose captions need "
                                                        "both inputs, a tiny CLAP audio encoder, scored from both "
                                                        "inputs, the image alone and the sound alone")
    p.add_argument("--scst", action="store_true", help="the SCST variant: the cross-entropy captioner, then as many "
                                                       "more cross-entropy steps or SCST steps, scored side by side "
                                                       "(default output demo_scst_out)")
    p.add_argument("--steps", type=positive_int, help="--scst: steps of each continuation (default: 60)")
    p.add_argument("--epochs", type=positive_int, help="training epochs (default: 12)")
    p.add_argument("--n-train", type=positive_int,
                   help="training items (default: 600 images; 432 scenes with --audio)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser
