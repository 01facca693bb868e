"""One rule per concept: a CSV with each accepted image-column name works in every command that reads a
table (caption --table, caption --output-dir, train/eval --data, score): every name through the readers
those commands call, and names that used to be refused through the CLI in-process."""

import json

import pytest
from PIL import Image

from captioner.cli import main
from captioner.data import (load_caption_set, load_references, match_prediction_ids, read_input_table,
                            read_predictions)
from captioner.data.columns import IMAGE_COLUMNS
from captioner.shards.sources import expand_shards
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
def test_each_image_column_name_works_in_every_table_reader(column, tmp_path):
    # the readers behind caption --table, caption --output-dir, train/eval --data and score
    table = _table(tmp_path, column)
    images = [str(tmp_path / "pics" / n) for n in ("a.png", "b.png")]
    items, problems = read_input_table(table)
    assert [it["image"] for it in items] == images and not problems
    (shard,) = expand_shards([str(table)])
    assert [item.path for item in shard] == images
    examples, _ = load_caption_set(table, None)
    assert [(e.image_id, e.image) for e in examples] == [("pics/a.png", images[0]), ("pics/b.png", images[1])]
    predictions = tmp_path / "p.csv"
    predictions.write_text(f"{column},caption\n{images[0]},a red square\npics/b.png,a square\n")
    references = load_references(table)
    assert match_prediction_ids(read_predictions(predictions), references) == {"pics/a.png": "a red square",
                                                                               "pics/b.png": "a square"}


def test_an_image_column_name_through_the_cli(model_dir, tmp_path, capsys, monkeypatch):
    column = "path"  # `caption --table` and `score` used to refuse it, `caption --output-dir` took it
    from captioner.scoring import metrics

    monkeypatch.setattr(metrics, "_java_problem", lambda: "not used here")  # pure-Python scorers: fast
    table = _table(tmp_path, column)
    model = ["--model", str(model_dir), "--max-new-tokens", "4", "--strategy", "greedy", "--num-workers", "0"]
    out = tmp_path / "out.jsonl"
    assert main(["caption", "--table", str(table), "--output", str(out), *model]) == 0
    rows = [json.loads(line) for line in out.read_text().split("\n") if line]
    assert sorted(r["image"] for r in rows) == [str(tmp_path / "pics" / n) for n in ("a.png", "b.png")]
    shards = tmp_path / "sharded"
    assert main(["caption", str(table), "--output-dir", str(shards), *model]) == 0
    assert len([line for line in (shards / "captions.jsonl").read_text().split("\n") if line]) == 2
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
