"""Command line: `captioner train | caption | eval | score | merge | bench | convert | push | demo`.

The only module that parses arguments: it builds configs, calls the library and prints. Flags for config
fields are generated from the dataclasses in config.py (help text and defaults live there; see flags.py).
Every command is `main(argv)` so tests run it in-process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from captioner.config import DecodeConfig, ModelConfig, load_config_file
from captioner.errors import CaptionerError
from captioner.flags import config_from_args
from captioner.parser import DATA_FIELDS, EXIT_CODES, EXIT_FAILURES, EXIT_OK, EXIT_OS, EXIT_USAGE, build_parser  # noqa: F401

logger = logging.getLogger("captioner")



class CLIError(CaptionerError):
    """A usage error found by the CLI: printed as one line, exit code 2."""


# ------------------------------------------------------------------ commands


def cmd_train(args) -> int:
    from captioner.config import TrainConfig
    from captioner.train.loop import train

    base = load_config_file(args.config) if args.config else {}
    model_base = base.pop("model", {}) if isinstance(base, dict) else {}
    if args.preset:  # under the config file and the flags: what is given explicitly wins
        from captioner.train.presets import preset_fields

        preset_train, preset_model = preset_fields(args.preset)
        base, model_base = {**preset_train, **base}, {**preset_model, **model_base}
    if getattr(args, "scst", base.get("scst")):  # SCST's usual lr and epochs, under the config file and flags
        from captioner.train.scst import SCST_DEFAULTS

        base = {**SCST_DEFAULTS, **base}
    model = config_from_args(ModelConfig, args, model_base)
    config = config_from_args(TrainConfig, args, base)
    config = dataclasses.replace(config, model=model)
    if not config.data:
        raise CLIError("--data is required (an imagefolder caption set), or give it in --config")
    tokenizer = None
    if args.preset:
        from captioner.train.presets import apply_preset

        config, tokenizer = apply_preset(config)
    best = train(config, tokenizer=tokenizer, argv=["captioner", *args._argv])
    print(f"best captioner saved to {best}" if best.name == "best" else
          f"captioner saved to {best} (no best/: no finite validation score)")
    return EXIT_OK


def cmd_tokenizer(args) -> int:
    from captioner.train.presets import caption_set_tokenizer

    out = Path(args.output)
    if (out / "tokenizer.json").exists() and not args.overwrite:
        raise CLIError(f"{out}: holds a tokenizer; pass --overwrite to replace it")
    tok = caption_set_tokenizer(args.data, args.split, vocab_size=args.vocab_size,
                                **{f: getattr(args, f) for f in DATA_FIELDS if hasattr(args, f)})
    tok.save_pretrained(out)
    print(f"tokenizer of {len(tok)} tokens saved to {out}")
    return EXIT_OK


def cmd_caption(args) -> int:
    from captioner.shards.caption_file import caption_to_file

    decode = config_from_args(DecodeConfig, args)
    if args.output_dir:
        if args.audio:
            raise CLIError("sharded captioning (--output-dir) reads sounds only as WebDataset tar members (KEY.wav beside "
                           "KEY.jpg); caption --audio files with --output")
        return _caption_sharded(args, decode)
    if args.table:
        if args.images or args.audio:
            raise CLIError("give inputs either as a --table or as images/--audio, not both")
        from captioner.data import read_input_table

        items, failures = read_input_table(args.table)
    elif not args.images and not args.audio:
        raise CLIError("give images (files, folders, globs) and/or --audio files")
    else:
        items, failures = _caption_inputs(args.images, args.audio)
    if args.resume and not args.output:
        raise CLIError("--resume needs --output (the file to continue)")
    for target in [args.output, args.errors or f"{args.output}.errors.jsonl"] if args.output else []:
        if Path(target).exists() and not (args.resume or args.overwrite):
            raise CLIError(f"{target}: exists; pass --resume to continue it or --overwrite to replace it")
    captioner = _load_captioner(args, decode)
    result = caption_to_file(
        captioner, items, args.output, decode=decode, fmt=args.format, resume=args.resume, overwrite=args.overwrite,
        errors=args.errors, failures=failures, other_inputs=[args.table] if args.table else [],
        batch_size=args.batch_size, max_pixels=args.max_pixels or None, num_workers=args.num_workers,
        jpeg_on_device=args.jpeg_on_device, on_result=None if args.output else _print_captions)
    if result.failures:
        print(f"{result.failed} input(s) failed:", file=sys.stderr)
        for line in result.failures:
            print(f"  {_printable(line)}", file=sys.stderr)
        if result.errors_path:
            print(f"failures listed in {_printable(str(result.errors_path))}", file=sys.stderr)
    print(f"captioned {result.captioned} input(s), {result.failed} failed, {result.skipped} skipped (already in the "
          f"output)", file=sys.stderr)
    return EXIT_FAILURES if result.failures else EXIT_OK


def _load_captioner(args, decode: DecodeConfig):
    """The captioner of `caption` and `eval`: --device, --dtype, --quantize; with --rerank clip and
    --clip-score-model, that model scores the candidates."""
    from captioner.api import Captioner

    captioner = Captioner.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if decode.rerank and args.clip_score_model:
        from captioner.scoring.evaluate import clip_scorer_for

        captioner.rerank_scorer, _ = clip_scorer_for(captioner, model=args.clip_score_model,
                                                     pretrained=args.clip_score_pretrained)
    return captioner


def _printable(text: str) -> str:
    """`text` with the undecodable bytes of file names (lone surrogates) shown as \\udcXY escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _print_captions(item: dict, captions: list[str]) -> None:
    """path<TAB>caption per caption; a name that is not valid UTF-8 is printed as its original bytes."""
    for c in captions:
        line = "\t".join([*item.values(), c]) + "\n"
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:
            print(_printable(line), end="", flush=True)
        else:
            sys.stdout.flush()
            buffer.write(line.encode("utf-8", "surrogateescape"))
            buffer.flush()


def _caption_inputs(images: list[str], audio: list[str] | None) -> tuple[list[dict], list[str]]:
    """Expand image and audio inputs into items {"image": path, "audio": path} (either or both) and the
    inputs that matched nothing. With both, the expanded lists pair in order
    (folders in sorted order), so their counts must match."""
    from captioner.data import collect_audio, collect_images

    image_paths, failures = collect_images(images) if images else ([], [])
    audio_paths, audio_failures = collect_audio(audio) if audio else ([], [])
    failures += audio_failures
    if images and audio:
        if len(image_paths) != len(audio_paths):
            raise CLIError(f"images and --audio pair in order, so their counts must match: {len(image_paths)} "
                           f"image(s), {len(audio_paths)} audio file(s)")
        unlike = [(i, a) for i, a in zip(image_paths, audio_paths) if Path(i).stem != Path(a).stem]
        if unlike:
            logger.warning("%d image/audio pairs have different file names, e.g. %s + %s", len(unlike), *unlike[0])
        items = [{"image": i, "audio": a} for i, a in zip(image_paths, audio_paths)]
    else:
        items = [{"image": p} for p in image_paths] or [{"audio": p} for p in audio_paths]
    return items, failures


def _caption_sharded(args, decode) -> int:
    """--output-dir: shard the inputs, caption this process's shards, merge when all are done."""
    import torch

    from captioner.shards import run as sharded
    from captioner.api import Captioner
    from captioner.shards.sources import expand_shards

    if args.output:
        raise CLIError("give either --output (one file) or --output-dir (sharded), not both")
    if decode.rerank:
        raise CLIError("--rerank is not available in sharded captioning (--output-dir); caption with --output")
    rank, world, local_rank = sharded.dist_env()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() and not args.quantize else "cpu")
    shards = expand_shards(args.images, files_per_shard=args.files_per_shard)
    captioner = Captioner.from_pretrained(args.model, device=device, dtype=args.dtype, quantize=args.quantize)
    t0 = time.perf_counter()
    results = sharded.run(captioner, shards, args.output_dir, decode=decode, batch_size=args.batch_size,
                          num_workers=args.num_workers, rank=rank, world=world, write_tars=args.write_shards,
                          max_pixels=args.max_pixels or None, jpeg_on_device=args.jpeg_on_device)
    n = sum(r.captioned + r.failed for r in results)
    failed = sum(r.failed for r in results)
    print(f"[rank {rank}/{world}] {len(results)} shard(s) captioned ({len(shards[rank::world]) - len(results)} "
          f"already done): {n - failed} images captioned, {failed} failed, "
          f"{n / max(time.perf_counter() - t0, 1e-9):.1f} images/s", file=sys.stderr)
    return EXIT_FAILURES if failed else EXIT_OK


def cmd_bench(args) -> int:
    """Run eval/bench.py of the source checkout this package was installed from."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "eval" / "bench.py"
    if not script.exists():
        raise CLIError(f"{script} not found: the benchmark ships with the source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location("captioner_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    try:
        return int(bench.main(list(args.bench_args), prog="captioner bench") or 0)
    except SystemExit as e:  # its own argparse: --help, bad arguments
        return int(e.code or 0)


def cmd_merge(args) -> int:
    from captioner.shards.merge import merge

    index = merge(args.output_dir)
    if index is None:
        raise CLIError(f"{args.output_dir}: some shards are not done yet; rerun the captioning job to finish them")
    print(f"merged {len(index['shards'])} shards: {index['rows']} captions, {index['failed']} failed items "
          f"-> {Path(args.output_dir) / 'captions.jsonl'}")
    return EXIT_OK


SCORE_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "SPIDEr",
               "CLIPScore", "RefCLIPScore")


def print_scores(corpus: dict, *, coco_exact: bool, skipped=(), columns: dict | None = None) -> None:
    """A metrics table: one row per metric, one column per system (default: a single 'score' column)."""
    columns = columns or {"score": corpus}
    exact = "COCO-exact (PTB tokenizer)" if coco_exact else "NOT COCO-exact (no Java: pure-Python tokenizer)"
    print(f"scores, {exact}:")
    print(f"  {'metric':<14}" + "".join(f"{name:>12}" for name in columns))
    for key in [k for k in SCORE_ORDER if k in corpus] + [k for k in corpus if k not in SCORE_ORDER]:
        print(f"  {key:<14}" + "".join(f"{col.get(key, float('nan')):>12.4f}" for col in columns.values()))
    for line in skipped:
        print(f"  note: {line}")


# TrainConfig fields that say how a caption set is read: `eval` takes the same flags (help text lives there).


def cmd_eval(args) -> int:
    from captioner.config import TrainConfig
    from captioner.data import load_caption_set
    from captioner.scoring import evaluate as ev_lib

    decode = config_from_args(DecodeConfig, args)
    captioner = _load_captioner(args, decode)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in DATA_FIELDS}
    examples, _ = load_caption_set(args.data, args.split, **{f: getattr(args, f, defaults[f]) for f in DATA_FIELDS})
    if args.limit:
        examples = examples[: args.limit]
    scorer = "auto"
    if args.no_clip_score:
        scorer = None
    elif args.clip_score_model and any(ex.image for ex in examples):
        scorer = captioner.rerank_scorer or ev_lib.clip_scorer_for(captioner, model=args.clip_score_model,
                                                                   pretrained=args.clip_score_pretrained)[0]
    ev = ev_lib.evaluate_captioner(
        captioner, examples, decode=decode, metrics=ev_lib.default_metrics(examples, spice=args.spice),
        modalities=args.modalities, batch_size=args.batch_size, num_workers=args.num_workers, clip_scorer=scorer,
        ablate=args.ablate, output_dir=args.output_dir, title=f"captioner eval: {args.data} [{args.split}]",
        info={"model": args.model, "data": args.data, "split": args.split})
    result = ev.result
    skipped = [line + (" (--clip-score-model NAME --clip-score-pretrained TAG)" if line == ev_lib.NO_TEXT_TOWER
                       else "") for line in ev.skipped]
    used = "+".join(args.modalities or captioner.model.modalities)
    print(f"{args.model} on {args.data} [{args.split}], {len(result.examples)} items, inputs: {used}:")
    print_scores(result.corpus, coco_exact=result.coco_exact, skipped=skipped)
    if any(ex.audio for ex in examples):
        from captioner.scoring.metrics import headline

        key, value = headline(result.corpus)
        print(f"  headline: {key} {value:.4f}" + ("" if key == "SPIDEr" else " (SPIDEr needs SPICE; see the note above)"))
    if ev.ablation:
        print("\nablation (same items, each input alone):")
        print_scores(result.corpus, coco_exact=result.coco_exact, columns=ev.ablation)
    if ev.files:
        scores, predictions, report = ev.files
        print(f"wrote {scores}, {predictions} (COCO results format) and {report}")
    return EXIT_OK


def cmd_push(args) -> int:
    from captioner import hub

    if args.card_only:
        path = hub.write_model_card(hub.model_dir_of(args.run_dir), args.card_only, repo_id=args.repo_id,
                                    scores=args.scores)
        print(f"wrote the model card to {path} (nothing uploaded)")
        return EXIT_OK
    url = hub.push_to_hub(args.run_dir, args.repo_id, private=args.private, revision=args.revision, scores=args.scores)
    print(f"pushed {args.run_dir} to {args.repo_id}: {url}")
    return EXIT_OK


def cmd_score(args) -> int:
    from captioner.scoring.evaluate import score_files

    if args.rank < 0:
        raise CLIError("--rank must be 0 or more")
    scores = score_files(args.predictions, args.references, split=args.split, spice=args.spice, output=args.output,
                         rank=args.rank)
    print(f"{args.predictions} against {args.references}, {len(scores.per_image)} images:")
    print_scores(scores.corpus, coco_exact=scores.coco_exact, skipped=scores.skipped)
    if args.output:
        print(f"wrote {args.output}")
    return EXIT_OK


def cmd_convert(args) -> int:
    from captioner.model.clipcap import convert_clipcap

    pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
    out = convert_clipcap(args.checkpoint, args.output, layout=args.layout, tokenizer=args.tokenizer,
                          clip_pretrained=pretrained, clip_config=args.clip_config)
    print(f"wrote {out} (caption with: captioner caption IMAGES --model {out})")
    return EXIT_OK


def cmd_serve(args) -> int:
    from captioner.serve.settings import ServeConfig

    try:
        from captioner.serve.app import serve_forever
    except ImportError as e:
        raise CLIError(f"serving needs the serve extra (pip install 'captioner[serve]'): {e}") from None
    from captioner.api import Captioner

    settings, decode = config_from_args(ServeConfig, args), config_from_args(DecodeConfig, args)
    if decode.rerank:  # the server keeps decoded tensors, not the images reranking scores against
        raise CLIError("serve does not rerank (--rerank): caption with `captioner caption --rerank clip` instead")
    serve_forever(lambda: Captioner.from_pretrained(args.model, device=args.device, dtype=args.dtype), settings,
                  decode, log_level="info" if args.verbose else "warning")
    return EXIT_OK


def cmd_demo(args) -> int:
    from captioner.demo.numerics import pin_kernels

    pin_kernels()  # before torch loads: the demo's numbers do not depend on the CPU's vector width
    from captioner.demo.runs import run_audio_demo, run_demo

    if args.audio:
        return _audio_demo(args, run_audio_demo)
    if args.scst:
        return _scst_demo(args)
    result = run_demo(args.output_dir, epochs=args.epochs or 12, n_train=args.n_train or 600, seed=args.seed)
    print("\nsample test captions (prediction | first reference):")
    for image, pred, refs in result.samples[:8]:
        print(f"  {Path(image).name}: {pred!r} | {refs[0]!r}")
    print("\ntest split, ", end="")
    print_scores(result.scores, coco_exact=result.coco_exact,
                 columns={"model": result.scores, "baseline": result.baseline},
                 skipped=[f"baseline: always answering the most frequent training caption "
                          f"{result.baseline_caption!r}"])
    print(f"\nmodel: {result.model_dir}\nreport: {result.report}")
    return EXIT_OK


def _audio_demo(args, run_audio_demo) -> int:
    kw = {"epochs": args.epochs} if args.epochs is not None else {}
    if args.n_train is not None:
        kw["n_train"] = args.n_train
    out = args.output_dir if args.output_dir != "demo_out" else "demo_audio_out"
    r = run_audio_demo(out, seed=args.seed, **kw)
    print("\nsample test captions (both | image only | audio only | first reference):")
    for item, both, image, audio, ref in r.samples[:6]:
        print(f"  {item}: {both!r} | {image!r} | {audio!r} | {ref!r}")
    print("\ntest split, CIDEr (NOT COCO-exact: pure-Python tokenizer, same for every column):")
    print(f"  {'inputs':<28}{'whole caption':>14}{'its part':>12}")
    print(f"  {'image + audio':<28}{r.whole['both']:>14.4f}{'':>12}")
    print(f"  {'image only':<28}{r.whole['image']:>14.4f}{r.parts['image']:>12.4f}")
    print(f"  {'audio only':<28}{r.whole['audio']:>14.4f}{r.parts['audio']:>12.4f}")
    print(f"  {'most frequent caption':<28}{r.whole['baseline']:>14.4f}{'':>12}")
    print(f"  {'most frequent image part':<28}{'':>14}{r.parts['image baseline']:>12.4f}")
    print(f"  {'most frequent sound part':<28}{'':>14}{r.parts['audio baseline']:>12.4f}")
    print(f"  note: baselines {r.baselines['caption']!r}, {r.baselines['image']!r}, {r.baselines['audio']!r}; "
          "'its part' scores the image (or sound) half of each caption against the same half of the references")
    print(f"\nmodel: {r.model_dir}\nreport: {r.report}")
    return EXIT_OK


def _scst_demo(args) -> int:
    from captioner.demo.runs import run_scst_demo

    kw = {k: v for k, v in (("xe_epochs", args.epochs), ("n_train", args.n_train), ("steps", args.steps)) if v}
    r = run_scst_demo(args.output_dir if args.output_dir != "demo_out" else "demo_scst_out", seed=args.seed, **kw)
    print("\ntest split, CIDEr (greedy captions; NOT COCO-exact: pure-Python tokenizer, same for every column):")
    print(f"  {'cross-entropy':>14}{'+ cross-entropy':>17}{'+ SCST':>10}")
    print(f"  {r.start:>14.4f}{r.xe:>17.4f}{r.scst:>10.4f}")
    q = max(1, len(r.rewards) // 3)
    print(f"  SCST mean reward (CIDEr-D of the samples): first {q} steps {sum(r.rewards[:q]) / q:.3f}, "
          f"last {q} steps {sum(r.rewards[-q:]) / q:.3f}")
    print(f"  seconds per step: cross-entropy {r.seconds_per_step['xe']:.3f}, SCST {r.seconds_per_step['scst']:.3f}")
    print(f"\nruns: {', '.join(str(p) for p in r.runs.values())}")
    return EXIT_OK


# ------------------------------------------------------------------ parser


COMMANDS = {"bench": cmd_bench, "caption": cmd_caption, "convert": cmd_convert, "demo": cmd_demo, "eval": cmd_eval, "merge": cmd_merge, "push": cmd_push, "score": cmd_score, "serve": cmd_serve, "tokenizer": cmd_tokenizer, "train": cmd_train}  # command word -> handler


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":  # everything after the command word is eval/bench.py's, verbatim
        args.bench_args = argv[next(i for i, a in enumerate(argv) if a == "bench") + 1:]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args._argv = argv
    # Our progress messages at INFO; libraries (accelerate, transformers) only when they warn.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("captioner").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except CaptionerError as e:
        print(f"captioner {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # missing folder, permission, disk full: one line, not a traceback
        print(f"captioner {args.command}: error: {os_error_line(e)}", file=sys.stderr)
        return EXIT_OS


def os_error_line(e: OSError) -> str:
    """"PATH: REASON" for an OSError (the library's own messages as they are)."""
    if e.filename is None or e.strerror is None:
        return " ".join(str(e).split()) or type(e).__name__
    name = os.fsdecode(e.filename) if isinstance(e.filename, (str, bytes, os.PathLike)) else str(e.filename)
    path = name if e.filename2 is None else f"{name} -> {os.fsdecode(e.filename2)}"
    return f"{path}: {e.strerror}"
