"""Full-size ClipCap conversion, offline: a synthetic checkpoint with the real shapes of coco_weights.pt
(512 -> 3840 -> 7680 MLP mapper, GPT-2 124M under `gpt.` with the legacy attn.bias/masked_bias buffers,
random values), converted with a random ViT-B/32 tower (open_clip ViT-B-32, pretrained=None) and used
to caption a small generated folder on CPU (beam 5, at most 67 tokens, stop at '.': ClipCap's settings).
Downloads nothing: the GPT-2 tokenizer is not available offline, so a byte-level BPE tokenizer is trained
on the fly (captioner.demo.tiny.train_tokenizer) and padded with placeholder tokens to GPT-2's 50,257
ids. Captions are of course noise; this checks the wiring and the times at full size.

    python eval/convert_clipcap_fullsize.py [--workdir DIR] [--images 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_checkpoint(vocab: int = 50257, seed: int = 0) -> dict[str, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=vocab))  # 124M: 12 layers, 768 wide, 1024 positions
    state = {"gpt." + k: v for k, v in gpt.state_dict().items()}
    for i in range(gpt.config.n_layer):  # what transformers < 4.3x saved and ClipCap's files carry
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1024, 1024, dtype=torch.uint8)).view(1, 1, 1024, 1024)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    state.update({"clip_project.model.0.weight": torch.randn(3840, 512) * 0.02,
                  "clip_project.model.0.bias": torch.zeros(3840),
                  "clip_project.model.2.weight": torch.randn(7680, 3840) * 0.02,
                  "clip_project.model.2.bias": torch.zeros(7680)})
    return state


def tokenizer_50257():
    from captioner.demo.tiny import train_tokenizer

    texts = [f"a {c} {s} on a {b} table." for c in ("red", "blue", "green", "small", "large")
             for s in ("cup", "dog", "cat", "car", "bird") for b in ("wooden", "white", "kitchen")]
    tok = train_tokenizer(texts * 10, vocab_size=400)
    tok.add_tokens([f"<unused{i}>" for i in range(50257 - len(tok))])
    return tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="where the checkpoint, converted model and images go (default: a temp dir)")
    p.add_argument("--images", type=int, default=4)
    args = p.parse_args(argv)
    from PIL import Image

    from captioner.api import Captioner
    from captioner.config import DecodeConfig
    from captioner.model.clipcap import convert_clipcap

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        state = synthetic_checkpoint()
        torch.save(state, work / "coco_weights.pt")
        n = sum(v.numel() for k, v in state.items() if not k.endswith(("attn.bias", "masked_bias")))
        print(f"synthetic checkpoint: {len(state)} keys, {n / 1e6:.1f}M parameters, "
              f"{(work / 'coco_weights.pt').stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t:.1f} s")
        del state
        t = time.perf_counter()
        tok = tokenizer_50257()
        print(f"tokenizer trained on the fly + padded to {len(tok)} ids: {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        out = convert_clipcap(work / "coco_weights.pt", work / "clipcap-coco", tokenizer=tok, clip_pretrained=None)
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        print(f"converted (random ViT-B-32 tower, saved with it) -> {out.name}/: {size:.0f} MiB, "
              f"{time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        cap = Captioner.from_pretrained(out, device="cpu")
        c = cap.config
        print(f"loaded: mapper {c.mapper} prefix {c.prefix_length} hidden {c.mlp_hidden}, features "
              f"{cap.model.encoders['image'].output_dim}-d raw (normalize={c.normalize_features}, "
              f"standardize={c.standardize_features}), stop_tokens {c.stop_tokens}: {time.perf_counter() - t:.1f} s")
        folder = work / "images"
        folder.mkdir(exist_ok=True)
        g = torch.Generator().manual_seed(0)
        for i in range(args.images):
            pixels = (torch.rand(240, 320, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"img{i}.png")
        paths = sorted(str(x) for x in folder.iterdir())
        for decode in (DecodeConfig(strategy="greedy", max_new_tokens=67),
                       DecodeConfig(strategy="beam", num_beams=5, max_new_tokens=67)):
            t = time.perf_counter()
            captions = cap.caption(paths, decode=decode, batch_size=len(paths))
            dt = time.perf_counter() - t
            print(f"{decode.strategy}: {len(paths)} images in {dt:.1f} s ({dt / len(paths):.2f} s/image); "
                  f"first caption {len(tok(captions[0])['input_ids'])} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
