"""Audio caption sets: imagefolder audio rows, audio table columns, Clotho and AudioCaps CSVs, Hugging Face
`datasets` audio columns, dispatch."""

import json
import os

import numpy as np
import pytest
import soundfile
from PIL import Image

from captioner.data import (DataError, collect_audio, load_caption_set, load_references, read_audiocaps,
                            read_caption_table, read_clotho, read_hf_dataset, read_imagefolder)


def _wavs(folder, *names, level=0.0):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(path, np.full(1600, level, "float32"), 16000)


def _where(problems):
    return [p.split(": ", 1)[0] for p in problems]


def test_collect_audio_folder_and_glob(tmp_path):
    _wavs(tmp_path, "b.wav", "sub/a.flac")
    (tmp_path / "c.mp3").write_bytes(b"")
    (tmp_path / "x.png").write_bytes(b"")  # not audio: left out of folder listings
    (tmp_path / "empty").mkdir()
    paths, errors = collect_audio([str(tmp_path), str(tmp_path / "*.wav"), str(tmp_path / "empty"),
                                   str(tmp_path / "*.ogg")])
    assert paths == [str(tmp_path / "b.wav"), str(tmp_path / "c.mp3"), str(tmp_path / "sub" / "a.flac"),
                     str(tmp_path / "b.wav")]
    assert errors[0].startswith(f"{tmp_path / 'empty'}: folder holds no audio files (.wav, .flac")
    assert errors[1] == f"{tmp_path / '*.ogg'}: pattern matches no file"


def test_imagefolder_rows_with_audio_image_or_both(tmp_path):
    split = tmp_path / "train"
    _wavs(split, "dog.wav", "clip.wav")
    _wavs(tmp_path, "outside.wav")
    Image.new("RGB", (8, 8)).save(split / "frame.png")
    meta = split / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps(row) for row in [
        {"audio_file": "dog.wav", "caption": "a dog barks"},                               # 1: audio only
        {"file_name": "frame.png", "audio_file": "clip.wav", "captions": ["a man talks"]},  # 2: both
        {"caption": "nothing to caption"},                                                 # 3: neither
        {"audio_file": "../outside.wav", "caption": "escape"},                             # 4
        {"audio_file": "gone.wav", "caption": "missing"},                                  # 5
        {"file_name": None, "audio_file": "dog.wav", "caption": "a dog again"},            # 6: null image = none
    ]) + "\n")
    examples, report = read_imagefolder(tmp_path, "train")
    assert [(e.image_id, e.image, e.audio, e.captions) for e in examples] == [
        ("train/dog", None, str(split / "dog.wav"), ["a dog barks", "a dog again"]),  # one item: rows merged
        ("train/frame", str(split / "frame.png"), str(split / "clip.wav"), ["a man talks"])]
    assert examples[1].inputs == {"image": str(split / "frame.png"), "audio": str(split / "clip.wav")}
    assert _where(report.problems) == [f"{meta}:{n}" for n in (3, 4, 5)]
    assert "'file_name'" in report.problems[0] and "'audio_file'" in report.problems[0]
    assert "audio path '../outside.wav' escapes the dataset folder" in report.problems[1]
    assert "audio file 'gone.wav' not found" in report.problems[2]
    with pytest.raises(DataError, match=r"train/metadata\.jsonl:3: row needs"):
        read_imagefolder(tmp_path, "train", strict=True)


def test_table_with_image_and_audio_columns(tmp_path):
    _wavs(tmp_path, "s/a.wav", "s/b.wav")
    Image.new("RGB", (8, 8)).save(tmp_path / "f.png")
    table = tmp_path / "t.csv"
    table.write_text("image,audio,caption\n"
                     "f.png,s/a.wav,a frame with sound\n"  # 2: both
                     ",./s/b.wav,a sound alone\n"          # 3: audio only, id is the normalised audio path
                     ",,nothing\n"                         # 4: neither
                     ",s/zz.wav,missing\n"                 # 5
                     "f.png,,the frame again\n")           # 6: image only, grouped with line 2
    examples, report = read_caption_table(table)
    assert [(e.image_id, e.image, e.audio, e.captions) for e in examples] == [
        ("f.png", str(tmp_path / "f.png"), str(tmp_path / "s/a.wav"), ["a frame with sound", "the frame again"]),
        ("s/b.wav", None, str(tmp_path / "./s/b.wav"), ["a sound alone"])]
    assert _where(report.problems) == [f"{table}:4", f"{table}:5"]
    assert "image field" in report.problems[0] and "'audio'" in report.problems[0]
    assert "audio file 's/zz.wav' not found" in report.problems[1]
    examples, _ = read_caption_table(table, require_images=False)  # references: the missing clip is kept
    assert [e.image_id for e in examples] == ["f.png", "s/b.wav", "s/zz.wav"]


def test_audio_only_tables_and_a_named_audio_column(tmp_path):
    _wavs(tmp_path, "a.wav", "b.wav")
    # auto-detected: an 'id' column next to an audio column names the clip, it is not an image path
    (tmp_path / "ids.csv").write_text("id,audio_file,caption\n7,a.wav,one\n8,b.wav,two\n")
    examples, report = read_caption_table(tmp_path / "ids.csv", image_column=None)
    assert [(e.image_id, e.image, e.audio) for e in examples] == [("a.wav", None, str(tmp_path / "a.wav")),
                                                                  ("b.wav", None, str(tmp_path / "b.wav"))]
    assert report.problems == []
    (tmp_path / "t.jsonl").write_text(json.dumps({"audio": "a.wav", "caption": ["x", "y"]}) + "\n")
    examples, _ = read_caption_table(tmp_path / "t.jsonl")
    assert [(e.image_id, e.audio, e.captions) for e in examples] == [("a.wav", str(tmp_path / "a.wav"), ["x", "y"])]
    (tmp_path / "named.tsv").write_text("sound\ttext\nb.wav\ta bell\n")
    examples, _ = read_caption_table(tmp_path / "named.tsv", audio_column="sound", caption_column="text")
    assert [(e.image_id, e.audio, e.captions) for e in examples] == [("b.wav", str(tmp_path / "b.wav"), ["a bell"])]
    with pytest.raises(DataError, match=r"named\.tsv:1: no audio column 'wave'"):
        read_caption_table(tmp_path / "named.tsv", audio_column="wave", caption_column="text")
    (tmp_path / "none.csv").write_text("sound,caption\nb.wav,x\n")
    with pytest.raises(DataError, match=r"none\.csv:1: no image column .*nor an audio column: 'audio', 'audio_file'"):
        read_caption_table(tmp_path / "none.csv")


CLOTHO_HEADER = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"


def _clotho(tmp_path):
    _wavs(tmp_path / "development", "Rain on a roof.wav", "Birds.wav")
    csv_path = tmp_path / "clotho_captions_development.csv"
    csv_path.write_text(CLOTHO_HEADER
                        + '"Rain on a roof.wav",rain falls,water drips,"rain, steady",a storm,drops hit metal\n'  # 2
                        + "Birds.wav,birds sing,,a bird calls,chirping,morning birds\n"  # 3: one caption empty
                        + "Gone.wav,a,b,c,d,e\n")  # 4: no such file
    return csv_path


def test_clotho_csv_rows_fallback_folder_and_missing_file(tmp_path):
    csv_path = _clotho(tmp_path)
    examples, report = read_clotho(csv_path)  # default root: the CSV's folder, then development/
    assert [(e.image_id, e.image, e.audio, e.captions, e.split) for e in examples] == [
        ("Rain on a roof.wav", None, str(tmp_path / "development" / "Rain on a roof.wav"),
         ["rain falls", "water drips", "rain, steady", "a storm", "drops hit metal"], "development"),
        ("Birds.wav", None, str(tmp_path / "development" / "Birds.wav"),
         ["birds sing", "a bird calls", "chirping", "morning birds"], "development")]
    assert report.problems == [(f"{csv_path}:4: audio file 'Gone.wav' not found "
                                f"(looked in {tmp_path}, {tmp_path / 'development'})")]
    with pytest.raises(DataError, match=r"clotho_captions_development\.csv:4: audio file 'Gone.wav' not found"):
        read_clotho(csv_path, strict=True)
    # another name: no split folder to fall back on, the stem labels the split; an explicit root is used
    other = tmp_path / "mine.csv"
    other.write_text(CLOTHO_HEADER + "Birds.wav,birds,,,,\n")
    with pytest.raises(DataError, match=r"no usable clips \(1 skipped\)"):
        read_clotho(other)
    examples, _ = read_clotho(other, tmp_path / "development")
    assert [(e.audio, e.captions, e.split) for e in examples] == [
        (str(tmp_path / "development" / "Birds.wav"), ["birds"], "mine")]


AUDIOCAPS_HEADER = "audiocap_id,youtube_id,start_time,caption\n"


def test_audiocaps_groups_clips_and_finds_each_file_naming(tmp_path):
    audio = tmp_path / "audio"
    # one clip saved under each convention; start times written as "30" and "30.0"
    _wavs(audio, "101.wav", "vidB_30.0.flac", "sub/YvidC.wav", "vidD.wav")
    csv_path = tmp_path / "val.csv"
    rows = [f"{100 + i},vidA,0,dog barking {i}" for i in range(5)]  # 2-6: one clip, five captions and ids
    csv_path.write_text(AUDIOCAPS_HEADER + "\n".join([
        *rows,
        "201,vidB,30,a car passes",   # 7: found as vidB_30.0 (integral start written as "30")
        "301,vidC,10.5,a bird",       # 8: found as YvidC, in a subfolder
        "401,vidD,5,rain",            # 9: found as vidD
        "501,vidE,7,nothing",         # 10: no file
        "502,vidE,7,still nothing",   # 11: same missing clip: not reported twice
        "601,,3,no id",               # 12
    ]) + "\n")
    examples, report = read_audiocaps(csv_path, audio)
    assert [(e.image_id, e.audio, e.split) for e in examples] == [
        ("vidA_0", str(audio / "101.wav"), "val"), ("vidB_30", str(audio / "vidB_30.0.flac"), "val"),
        ("vidC_10.5", str(audio / "sub" / "YvidC.wav"), "val"), ("vidD_5", str(audio / "vidD.wav"), "val")]
    assert examples[0].captions == [f"dog barking {i}" for i in range(5)]  # file 101.wav: its second row's id
    assert report.problems == [  # files are looked up once all rows are read
        f"{csv_path}:12: row needs a youtube_id and a start_time (non-empty, valid UTF-8)",
        (f"{csv_path}:10: audio for youtube_id vidE (start 7) not found in {audio} "
         "(tried 501, 502, vidE_7, vidE_7.0, YvidE, vidE)")]
    csv_path.write_text(csv_path.read_text().replace("601,,3,no id\n", ""))
    with pytest.raises(DataError, match=r"val\.csv:10: audio for youtube_id vidE"):
        read_audiocaps(csv_path, audio, strict=True)
    # default root is the CSV's folder (searched recursively); references need no files at all
    assert [e.image_id for e in read_audiocaps(csv_path)[0]] == ["vidA_0", "vidB_30", "vidC_10.5", "vidD_5"]
    examples, report = read_audiocaps(csv_path, tmp_path / "nowhere", require_files=False)
    assert [(e.image_id, e.audio) for e in examples][-1] == ("vidE_7", None) and report.problems == []


def test_load_caption_set_dispatches_audio_sets(tmp_path):
    csv_path = _clotho(tmp_path / "clotho")
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # a BOM before 'file_name' still reads as Clotho
    examples, _ = load_caption_set(csv_path, "val")  # one split already: `split` only labels
    assert [(e.image_id, e.split) for e in examples] == [("Rain on a roof.wav", "val"), ("Birds.wav", "val")]
    _wavs(tmp_path / "wavs", "Yabc.wav")  # beside, not below, the CSV's folder: found through audio_root only
    (tmp_path / "ac").mkdir()
    (tmp_path / "ac" / "test.csv").write_text(AUDIOCAPS_HEADER + "1,abc,0,a hum\n")
    with pytest.raises(DataError, match=r"test\.csv: no usable clips"):
        load_caption_set(tmp_path / "ac" / "test.csv", None)
    examples, _ = load_caption_set(tmp_path / "ac" / "test.csv", None, audio_root=tmp_path / "wavs")
    assert [(e.image_id, e.audio, e.split) for e in examples] == [("abc_0", str(tmp_path / "wavs/Yabc.wav"), "test")]
    table = tmp_path / "wavs" / "t.csv"
    table.write_text("clip,caption\nYabc.wav,a hum\n")
    examples, _ = load_caption_set(table, "train", audio_column="clip")
    assert [(e.image_id, e.image, e.audio) for e in examples] == [("Yabc.wav", None, str(tmp_path / "wavs/Yabc.wav"))]
    folder = tmp_path / "if"
    _wavs(folder / "test", "x.wav")
    (folder / "test" / "metadata.jsonl").write_text(json.dumps({"audio_file": "x.wav", "caption": "x"}) + "\n")
    examples, _ = load_caption_set(folder, "test")
    assert [(e.image_id, e.audio) for e in examples] == [("test/x", str(folder / "test" / "x.wav"))]
    with pytest.raises(DataError, match="audio root applies only to Clotho and AudioCaps"):
        load_caption_set(table, "train", audio_root=tmp_path)
    with pytest.raises(DataError, match="audio root applies only to Clotho and AudioCaps"):
        load_caption_set(folder, "test", audio_root=tmp_path)
    with pytest.raises(DataError, match="audio column applies only to .csv/.tsv/.jsonl caption tables"):
        load_caption_set(csv_path, None, audio_column="file_name")
    with pytest.raises(DataError, match="image root applies only to COCO/Karpathy"):
        load_caption_set(csv_path, None, image_root=tmp_path)


def test_load_references_reads_audio_sets_without_files(tmp_path):
    (tmp_path / "clotho_captions_evaluation.csv").write_text(CLOTHO_HEADER + "a.wav,one,two,,,\nb.wav,three,,,,\n")
    assert load_references(tmp_path / "clotho_captions_evaluation.csv") == {"a.wav": ["one", "two"],
                                                                           "b.wav": ["three"]}
    (tmp_path / "test.csv").write_text(AUDIOCAPS_HEADER + "1,v1,0,a\n2,v1,0,b\n3,v2,10,c\n")
    assert load_references(tmp_path / "test.csv") == {"v1_0": ["a", "b"], "v2_10": ["c"]}
    (tmp_path / "if" / "test").mkdir(parents=True)
    (tmp_path / "if" / "test" / "metadata.jsonl").write_text(
        json.dumps({"audio_file": "s.wav", "caption": "a"}) + "\n"
        + json.dumps({"audio_file": "s.wav", "caption": "b"}) + "\n"
        + json.dumps({"file_name": "f.png", "audio_file": "s2.wav", "caption": "c"}) + "\n")
    assert load_references(tmp_path / "if") == {"test/s": ["a", "b"], "test/f": ["c"]}


# ------------------------------------------------------------------ Hugging Face `datasets` audio columns

def _hf_save(folder, columns, audio_feature="audio"):
    """A saved Dataset of `columns`; the `audio_feature` column (a {'bytes', 'path'} struct) cast to Audio."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict(columns)
    if audio_feature is not None:
        ds = ds.cast_column(audio_feature, datasets.Audio())
    ds.save_to_disk(str(folder))
    return folder


def _clip_bytes(tmp_path, level):
    _wavs(tmp_path / "src", f"{level}.wav", level=level)
    return (tmp_path / "src" / f"{level}.wav").read_bytes()


def _samples(path):
    return soundfile.read(path, dtype="int16")


def test_hf_audio_only_dataset_writes_each_sound_once(tmp_path):
    clips = [_clip_bytes(tmp_path, level) for level in (0.25, -0.5)]
    spec = _hf_save(tmp_path / "ds", {
        "audio": [{"bytes": clips[0], "path": None},     # 0: a format sniffed from the bytes
                  {"bytes": clips[1], "path": "b.wav"},  # 1: named by its path (not a file here)
                  {"bytes": b"not a sound", "path": None}],
        "file_name": ["a.wav", "b.wav", "c.wav"],  # a generic path column beside audio: not taken as images
        "caption": [["a low hum"], ["a loud hum", "humming"], ["junk"]]})
    cache = tmp_path / "cache"
    examples, report = load_caption_set(spec, "train", cache_dir=cache)
    assert [(e.image_id, e.image, e.captions) for e in examples] == [("train/0", None, ["a low hum"]),
                                                                    ("train/1", None, ["a loud hum", "humming"])]
    assert report.problems == [f"{spec}: train[2]: audio bytes are not a recognised sound"]
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["0.audio.wav", "1.audio.wav"]
    for ex, level in zip(examples, (0.25, -0.5)):
        assert ex.audio.startswith(str(cache))
        samples, rate = _samples(ex.audio)
        assert rate == 16000 and np.array_equal(samples, _samples(tmp_path / "src" / f"{level}.wav")[0])
    old = 1_000_000_000
    for ex in examples:
        os.utime(ex.audio, ns=(old, old))
    again, _ = read_hf_dataset(str(spec), "train", cache_dir=cache)
    assert [e.audio for e in again] == [e.audio for e in examples]
    assert all(os.stat(e.audio).st_mtime_ns == old for e in again)  # reused, not rewritten
    with pytest.raises(DataError, match=r"ds: train\[2\]: audio bytes are not a recognised sound"):
        read_hf_dataset(str(spec), "train", strict=True, cache_dir=cache)


def test_hf_image_and_audio_rows_share_a_row_index_without_colliding(tmp_path):
    clip = _clip_bytes(tmp_path, 0.5)
    frame = Image.new("RGB", (6, 4), (200, 10, 10))
    spec = _hf_save(tmp_path / "ds", {
        "image": [frame, None, None, frame],
        "sound": [{"bytes": clip, "path": None}, {"bytes": clip, "path": None}, None, None],  # an Audio feature
        "caption": ["both", "sound only", "neither", "image only"]}, audio_feature="sound")
    cache = tmp_path / "cache"
    examples, report = load_caption_set(spec, "val", cache_dir=cache)
    folder = next(cache.glob("*/val"))
    assert [(e.image_id, e.image, e.audio) for e in examples] == [
        ("val/0", str(folder / "0.png"), str(folder / "0.audio.wav")), ("val/1", None, str(folder / "1.audio.wav")),
        ("val/3", str(folder / "3.png"), None)]
    assert report.problems == [f"{spec}: val[2]: no image and no audio"]
    assert Image.open(examples[0].image).getpixel((0, 0)) == (200, 10, 10)
    assert np.array_equal(_samples(examples[0].audio)[0], _samples(tmp_path / "src" / "0.5.wav")[0])


def test_hf_decoded_audio_arrays_become_16_bit_wavs(tmp_path):
    wave = np.sin(np.linspace(0, 20, 800)) * 0.8
    spec = _hf_save(tmp_path / "ds", {
        "audio": [{"array": wave.tolist(), "sampling_rate": 22050}, {"array": [0.1], "sampling_rate": 0},
                  {"array": [], "sampling_rate": 16000}],
        "caption": ["a tone", "no rate", "no samples"]}, audio_feature=None)  # a plain struct column
    examples, report = load_caption_set(spec, "train", cache_dir=tmp_path / "cache")
    assert [(e.image_id, os.path.basename(e.audio)) for e in examples] == [("train/0", "0.audio.wav")]
    info = soundfile.info(examples[0].audio)
    assert (info.format, info.subtype, info.samplerate) == ("WAV", "PCM_16", 22050)
    assert np.allclose(soundfile.read(examples[0].audio)[0], wave, atol=1 / 2**15)
    assert [p.split(": ", 2)[2] for p in report.problems] == [
        "audio sampling_rate must be a positive integer, not 0", "audio array is empty"]


def test_hf_named_audio_column_paths_are_used_in_place(tmp_path):
    ds = tmp_path / "ds"
    _wavs(ds, "clips/a.wav")  # relative paths start at the dataset's folder
    _hf_save(ds, {"clip": ["clips/a.wav", "clips/gone.wav", None], "audio": ["x", "y", "z"],
                  "caption": ["a", "b", "c"]}, audio_feature=None)
    cache = tmp_path / "cache"
    examples, report = load_caption_set(ds, "train", audio_column="clip", cache_dir=cache)
    assert [(e.image_id, e.image, e.audio) for e in examples] == [("train/0", None, str(ds / "clips/a.wav"))]
    assert report.problems == [f"{ds}: train[1]: audio file 'clips/gone.wav' not found",
                               f"{ds}: train[2]: no audio"]  # the only input column: an empty cell is missing
    assert not cache.exists()  # nothing copied
    with pytest.raises(DataError, match=r"no audio column 'sound' \(columns: 'clip', 'audio', 'caption'\)"):
        load_caption_set(ds, "train", audio_column="sound", cache_dir=cache)
    with pytest.raises(DataError, match=r"no image column 'picture'"):  # named: required even beside audio
        load_caption_set(ds, "train", image_column="picture", audio_column="clip", cache_dir=cache)


def test_hf_numbered_caption_columns_are_all_read(tmp_path):
    """Clotho on the hub: caption_1 .. caption_5 columns, all references of a clip (empty cells skipped);
    a comma-separated --caption-column picks some of them, in the order given."""
    clip = _clip_bytes(tmp_path, 0.25)
    spec = _hf_save(tmp_path / "ds", {
        "audio": [{"bytes": clip, "path": None}] * 2,
        "caption_2": ["a hum two", "b two"], "caption_10": ["a hum ten", None], "caption_1": ["a hum one", "b one"]})
    examples, report = read_hf_dataset(str(spec), "train", cache_dir=tmp_path / "c")
    assert [e.captions for e in examples] == [["a hum one", "a hum two", "a hum ten"], ["b one", "b two"]]
    assert report.problems == []
    picked, _ = read_hf_dataset(str(spec), "train", cache_dir=tmp_path / "c", caption_column="caption_10,caption_1")
    assert [e.captions for e in picked] == [["a hum ten", "a hum one"], ["b one"]]
    with pytest.raises(DataError, match="no caption column 'caption_3'"):
        read_hf_dataset(str(spec), "train", cache_dir=tmp_path / "c", caption_column="caption_1,caption_3")
