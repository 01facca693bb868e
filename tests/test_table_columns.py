"""One rule per concept: a CSV with each accepted image-column name works in every command that reads a
table (caption --table, caption --output-dir, train/eval --data, score), through the CLI in-process."""

import json

import pytest
from PIL import Image

from captioner.cli import main
from captioner.data import load_caption_set
from captioner.data.columns import IMAGE_COLUMNS
from conftest import tiny_train_argv


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    import torch

    from captioner.api import Captioner
    from captioner.demo.tiny import tiny_config

    torch.manual_seed(0)
    captioner = Captioner.from_config(tiny_config(tokenizer), tokenizer=tokenizer, device="cpu")
    return captioner.save_pretrained(tmp_path_factory.mktemp("model") / "m")


def _table(folder, column):
    """Two images and a CSV whose image column is `column`; returns the CSV's path."""
    (folder / "pics").mkdir(parents=True)
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (16, 16), colour).save(folder / "pics" / name)
    table = folder / "t.csv"
    table.write_text(f"{column},caption\npics/a.png,a red square\npics/b.png,a blue square\n")
    return table


@pytest.mark.parametrize("column", IMAGE_COLUMNS)
def test_each_image_column_name_works_in_every_command(column, model_dir, tmp_path, capsys):
    table = _table(tmp_path, column)
    model = ["--model", str(model_dir), "--max-new-tokens", "4", "--strategy", "greedy"]
    # caption --table: one result row per image
    out = tmp_path / "out.jsonl"
    assert main(["caption", "--table", str(table), "--output", str(out), *model]) == 0
    rows = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert sorted(r["image"] for r in rows) == [str(tmp_path / "pics" / n) for n in ("a.png", "b.png")]
    # caption --output-dir: the CSV is one shard
    shards = tmp_path / "sharded"
    assert main(["caption", str(table), "--output-dir", str(shards), *model]) == 0
    merged = [json.loads(line) for line in (shards / "captions.jsonl").read_text().split("\n") if line]
    assert len(merged) == 2
    # eval --data and score: the table is a caption set and a reference file
    examples, _ = load_caption_set(table, None)
    assert [e.image_id for e in examples] == ["pics/a.png", "pics/b.png"]
    assert main(["eval", "--data", str(table), "--split", "t", "--no-clip-score", *model]) == 0
    predictions = tmp_path / "p.csv"
    predictions.write_text(f"{column},caption\npics/a.png,a red square\npics/b.png,a square\n")
    assert main(["score", "--predictions", str(predictions), "--references", str(table)]) == 0
    assert "CIDEr" in capsys.readouterr().out


def test_train_reads_a_table_with_a_path_column(tmp_path):
    table = _table(tmp_path, "path")
    examples, _ = load_caption_set(table, None)
    argv = tiny_train_argv(table, tmp_path, examples, epochs=1, batch_size=2, extra=["--val-split", "none"])
    assert main(argv) == 0
    assert (tmp_path / "run" / "best" / "config.json").exists() or (tmp_path / "run" / "last" / "config.json").exists()
