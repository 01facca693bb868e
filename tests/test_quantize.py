"""int8 CPU path (model/quantize.py): Conv1D -> Linear is exact, quantized layers are really there, captions
come out of the API and the caption / eval commands, and a GPU device is refused in one line."""

import copy
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.cli import main
from captioner.errors import ConfigError
from captioner.model.quantize import conv1d_to_linear, is_quantized, quantize_int8


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny captioner with the MLP mapper (every layer quantizable), saved."""
    from captioner.demo.tiny import tiny_config

    torch.manual_seed(0)
    cap = Captioner.from_config(tiny_config(tokenizer, mapper="mlp"), tokenizer=tokenizer, device="cpu")
    return cap.save_pretrained(tmp_path_factory.mktemp("quant") / "model")


def test_conv1d_to_linear_is_exact(saved):
    from transformers.pytorch_utils import Conv1D

    cap = Captioner.from_pretrained(saved, device="cpu")
    lm = cap.model.lm
    ids = torch.randint(0, lm.config.vocab_size, (3, 9))
    with torch.no_grad():
        before = lm(input_ids=ids).logits
        converted = copy.deepcopy(lm)
        n = conv1d_to_linear(converted)
        after = converted(input_ids=ids).logits
    assert n == 4 * lm.config.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj per block
    assert not any(isinstance(m, Conv1D) for m in converted.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_quantized_api_captions_and_layers(saved, shapes_data):
    fp32 = Captioner.from_pretrained(saved, device="cpu")
    q = Captioner.from_pretrained(saved, quantize="int8")  # the CPU by default
    assert q.device.type == "cpu" and q.quantize == "int8"
    lm_linear = [n for n, m in q.model.lm.named_modules() if is_quantized(m)]
    layers = q.model.lm.config.n_layer
    assert len(lm_linear) == 4 * layers + 1  # the four projections of each block + the vocabulary head
    assert sum(is_quantized(m) for m in q.model.mappers.modules()) == 2  # the MLP's two layers
    assert not any(type(m) is torch.nn.Linear for m in q.model.lm.modules())
    # The quantized model computes nearly the float32 function: next-token logits of the same prefix.
    feats = torch.randn(4, fp32.model.image_encoder.output_dim)
    with torch.no_grad():
        ref = fp32.model.lm(inputs_embeds=fp32.model.prefix_embeds(feats)[0]).logits[:, -1]
        got = q.model.lm(inputs_embeds=q.model.prefix_embeds(feats)[0]).logits[:, -1]
    assert torch.nn.functional.cosine_similarity(ref, got, dim=-1).min() > 0.99
    images = sorted((Path(shapes_data) / "test").glob("*.png"))[:3]
    captions = q.caption([str(p) for p in images], strategy="beam", num_beams=3, max_new_tokens=8)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    with pytest.raises(ConfigError, match="quantized captioner is not saved"):
        q.save_pretrained(Path(saved).parent / "q")


def test_quantize_refused_off_cpu(saved):
    with pytest.raises(ConfigError, match="CPU only"):
        Captioner.from_pretrained(saved, device="cuda", quantize="int8")
    cap = Captioner.from_pretrained(saved, device="cpu", dtype="bfloat16")
    with pytest.raises(ConfigError, match="float32"):
        quantize_int8(cap.model)


def test_cli_caption_and_eval_int8(saved, shapes_data, tmp_path, capsys):
    images = sorted((Path(shapes_data) / "test").glob("*.png"))[:2]
    assert main(["caption", *map(str, images), "--model", str(saved), "--quantize", "int8",
                 "--strategy", "greedy", "--num-workers", "0", "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in images]
    assert main(["eval", "--model", str(saved), "--data", str(shapes_data), "--limit", "2", "--quantize", "int8",
                 "--strategy", "greedy", "--no-clip-score", "--num-workers", "0", "--max-new-tokens", "8", "--output-dir", str(tmp_path / "ev")]) == 0
    assert "CIDEr" in capsys.readouterr().out and (tmp_path / "ev" / "scores.json").exists()
    code = main(["caption", str(images[0]), "--model", str(saved), "--quantize", "int8", "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "CPU only" in err
