"""Model names and the Hub (hub.resolve_model, push_to_hub, model cards), offline: huggingface_hub's cache
layout is built in a temporary HF_HOME (models--owner--name/snapshots/<commit>/..., refs/<branch>) and read by
the real huggingface_hub in local-files mode; the network calls are replaced where a test needs them online.
The ClipCap converter is replaced by a fake that writes a tiny saved captioner."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from captioner import hub
from captioner.api import Captioner
from captioner.cli import main
from captioner.errors import HubError, ModelLoadError

SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty Hugging Face home (cache in HF_HOME/hub), offline unless a test says otherwise."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def cache_snapshot(home: Path, repo_id: str, commit: str, files: dict[str, Path | bytes], refs=("main",)) -> Path:
    """Put files into the hub cache as huggingface_hub lays it out, with refs/<ref> naming `commit`."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def saved_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if p.is_file()}


def mapper_state(cap):
    return {k: v.clone() for k, v in cap.model.state_dict().items() if k.startswith("mappers")}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def fake_converter(monkeypatch, make_captioner):
    """captioner.model.clipcap replaced: convert_clipcap saves a tiny captioner and records its calls."""
    calls = []
    source = make_captioner(seed=3)

    def convert_clipcap(checkpoint, output_dir, *, layout=None, tokenizer=None, clip_pretrained="openai"):
        calls.append(Path(checkpoint))
        assert Path(checkpoint).read_bytes() == b"clipcap state dict"
        return source.save_pretrained(output_dir)
    module = types.ModuleType("captioner.model.clipcap")
    module.convert_clipcap = convert_clipcap
    monkeypatch.setitem(sys.modules, "captioner.model.clipcap", module)
    return calls, source


def test_known_name_is_downloaded_converted_once_and_loaded(hf_home, fake_converter):
    calls, source = fake_converter
    known = hub.KNOWN_MODELS["clipcap-coco"]
    assert (known.repo_id, known.filename) == ("akhaliq/CLIP-prefix-captioning-COCO-weights", "coco_weights.pt")
    snapshot = cache_snapshot(hf_home, known.repo_id, SHA_A, {known.filename: b"clipcap state dict"})
    first = Captioner.from_pretrained("clipcap-coco", device="cpu")
    second = Captioner.from_pretrained("clipcap-coco", device="cpu")
    assert calls == [snapshot / known.filename]  # converted once, from the cached file; the second load reuses it
    converted = hf_home / "captioner" / "converted" / f"clipcap-coco-{SHA_A[:12]}"
    assert (converted / "model.safetensors").is_file() and not list(converted.parent.glob(".*"))  # no leftovers
    assert same_weights(mapper_state(first), mapper_state(source))
    assert same_weights(mapper_state(second), mapper_state(source))


def test_known_name_offline_and_not_cached_is_one_line(hf_home, fake_converter):
    with pytest.raises(ModelLoadError) as e:
        Captioner.from_pretrained("clipcap-conceptual", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "akhaliq/CLIP-prefix-captioning-conceptual-weights" in msg
    assert "conceptual_weights.pt" in msg and "not in the Hugging Face cache" in msg and "local" in msg
    assert fake_converter[0] == []


def test_hub_id_revision_pinning_from_the_cache(hf_home, make_captioner, tmp_path):
    """refs/main names the newest commit; @commit and @branch pin older ones."""
    old, new = make_captioner(seed=1), make_captioner(seed=2)
    old_dir, new_dir = old.save_pretrained(tmp_path / "old"), new.save_pretrained(tmp_path / "new")
    cache_snapshot(hf_home, "someone/tiny-captioner", SHA_A, saved_files(old_dir), refs=("v1",))
    cache_snapshot(hf_home, "someone/tiny-captioner", SHA_B, saved_files(new_dir), refs=("main",))
    assert not same_weights(mapper_state(old), mapper_state(new))
    for name, expected in [("someone/tiny-captioner", new), (f"someone/tiny-captioner@{SHA_A}", old),
                           ("someone/tiny-captioner@v1", old), (f"someone/tiny-captioner@{SHA_B}", new)]:
        loaded = Captioner.from_pretrained(name, device="cpu")
        assert same_weights(mapper_state(loaded), mapper_state(expected)), name


def test_hub_id_online_downloads_files_only_at_the_revision(monkeypatch, make_captioner, tmp_path):
    import huggingface_hub

    saved = make_captioner(seed=1).save_pretrained(tmp_path / "snap")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(saved)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert hub.resolve_model("someone/tiny@dev") == saved
    (repo_id, kwargs), = calls
    assert (repo_id, kwargs["revision"], kwargs["local_files_only"]) == ("someone/tiny", "dev", False)
    # only weights, config, tokenizer and card: never code
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(kwargs["allow_patterns"])
    assert not any(p.endswith(".py") or "*" in p for p in kwargs["allow_patterns"])


def test_hub_id_offline_and_missing_is_one_line_naming_a_local_path(hf_home, tmp_path, monkeypatch, capsys):
    with pytest.raises(ModelLoadError) as e:
        Captioner.from_pretrained("someone/not-downloaded@v2", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "someone/not-downloaded" in msg and "revision v2" in msg
    assert "not in the Hugging Face cache" in msg and "path of a saved captioner directory" in msg
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["caption", str(tmp_path / "a.png"), "--model", "someone/not-downloaded"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("captioner caption: error: could not load captioner")


def test_hub_repo_without_a_captioner_is_refused(hf_home):
    cache_snapshot(hf_home, "someone/not-a-captioner", SHA_A, {"README.md": b"# hi\n"})
    with pytest.raises(ModelLoadError, match=r"someone/not-a-captioner is not a saved captioner \(no config.json, "
                                             r"model.safetensors\)"):
        Captioner.from_pretrained("someone/not-a-captioner", device="cpu")


def test_local_directory_wins_over_a_hub_id(tmp_path, monkeypatch, make_captioner):
    import huggingface_hub

    cap = make_captioner(seed=4)
    cap.save_pretrained(tmp_path / "someone" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("the Hub was asked"))
    loaded = Captioner.from_pretrained("someone/tiny", device="cpu")
    assert same_weights(mapper_state(loaded), mapper_state(cap))


# ------------------------------------------------------------------ push and model cards

SCORES = {"model": "run/best", "data": "hf:someone/shapes", "split": "test", "decode": {"strategy": "beam",
          "num_beams": 3}, "corpus": {"Bleu_4": 0.41234, "CIDEr": 1.23456, "METEOR": float("nan")},
          "coco_exact": False, "per_image": {"1": {}, "2": {}}}


@pytest.fixture
def run_dir(tmp_path, make_captioner):
    """A training run as `captioner train` and `captioner eval --output-dir run/eval` leave it."""
    run = tmp_path / "run"
    make_captioner(seed=5).save_pretrained(run / "best")
    (run / "train_config.json").write_text(json.dumps({"data": "hf:someone/shapes", "epochs": 7, "lr": 0.002}))
    (run / "eval").mkdir()
    (run / "eval" / "scores.json").write_text(json.dumps(SCORES))
    return run


@pytest.fixture
def fake_api(monkeypatch):
    """HfApi's network methods replaced: each call is recorded; create_commit keeps the uploaded bytes."""
    from huggingface_hub import HfApi

    calls = {}

    def create_commit(self, repo_id, operations, *, commit_message, revision=None, **kw):
        calls["commit"] = dict(repo_id=repo_id, revision=revision, message=commit_message, files={
            op.path_in_repo: (Path(op.path_or_fileobj).read_bytes() if isinstance(op.path_or_fileobj, str)
                              else op.path_or_fileobj) for op in operations})
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{SHA_A}")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.setdefault("branch", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def parse_card(text: str):
    from huggingface_hub import ModelCard

    return ModelCard(text, ignore_metadata_errors=False)


def test_push_uploads_the_files_and_a_card_with_the_measured_scores(run_dir, fake_api, capsys):
    assert main(["push", str(run_dir), "me/tiny-captioner", "--private", "--revision", "dev"]) == 0
    assert fake_api["repo"] == ("me/tiny-captioner", {"private": True, "exist_ok": True})
    assert fake_api["branch"] == ("me/tiny-captioner", {"branch": "dev", "exist_ok": True})
    commit = fake_api["commit"]
    assert commit["revision"] == "dev" and commit["repo_id"] == "me/tiny-captioner"
    best = run_dir / "best"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert commit["files"][name] == (best / name).read_bytes(), name
    card = parse_card(commit["files"]["README.md"].decode())
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.datasets) == ("captioner", "image-to-text", ["someone/shapes"])
    measured = {r.metric_name: r.metric_value for r in data.eval_results}
    assert measured == {"Bleu_4": 0.4123, "CIDEr": 1.2346}  # from scores.json; NaN left out
    assert {r.dataset_split for r in data.eval_results} == {"test"}
    assert "| CIDEr | 1.2346 |" in card.text and "NOT COCO-exact" in card.text and "num_beams 3" in card.text
    assert "custom open_clip image tower" in card.text  # the tiny tower is not the clip_model name
    assert '"epochs": 7' in card.text and "## Intended use" in card.text and "## Limitations" in card.text
    assert "--model me/tiny-captioner" in card.text
    assert "pushed" in capsys.readouterr().out


def test_push_failure_is_one_line(run_dir, monkeypatch, capsys):
    from huggingface_hub import HfApi

    def refuse(self, *a, **k):
        raise RuntimeError("401 Client Error: Unauthorized\nfor url https://huggingface.co/api/repos/create")
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubError, match="could not push .* to Hub repo me/x: RuntimeError: 401"):
        hub.push_to_hub(run_dir, "me/x")
    assert main(["push", str(run_dir), "me/x"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_captioner_push_to_hub_saves_and_uploads(make_captioner, fake_api):
    cap = make_captioner(seed=6)
    url = cap.push_to_hub("me/direct", scores=SCORES)
    assert url.endswith(SHA_A) and fake_api["commit"]["revision"] is None
    files = fake_api["commit"]["files"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert "| Bleu_4 | 0.4123 |" in files["README.md"].decode()


def test_model_card_written_offline_without_scores(tmp_path, make_captioner):
    model = make_captioner(seed=7).save_pretrained(tmp_path / "model")
    path = hub.write_model_card(model, tmp_path / "card" / "README.md")
    card = parse_card(path.read_text())
    assert card.data.library_name == "captioner" and card.data.eval_results is None
    assert "No evaluation scores" in card.text and "training config was not found" in card.text


def test_push_card_only_writes_the_card_and_uploads_nothing(run_dir, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("uploaded"))
    out = tmp_path / "README.md"
    assert main(["push", str(run_dir), "me/tiny", "--card-only", str(out)]) == 0
    measured = {r.metric_name: r.metric_value for r in parse_card(out.read_text()).data.eval_results}
    assert measured["CIDEr"] == 1.2346


def test_demo_layout_scores_beside_the_run_are_found_only_for_their_model(tmp_path, make_captioner, monkeypatch):
    """make demo: model in demo_out/run/best, `captioner eval --model demo_out/run/best --output-dir demo_out/eval`."""
    monkeypatch.chdir(tmp_path)
    model = make_captioner(seed=8).save_pretrained(tmp_path / "demo_out" / "run" / "best")
    (tmp_path / "demo_out" / "eval").mkdir()
    scores = tmp_path / "demo_out" / "eval" / "scores.json"
    scores.write_text(json.dumps({**SCORES, "model": "demo_out/run/last"}))
    assert hub.run_files(model) == (None, None)  # another model's scores are not this one's
    scores.write_text(json.dumps({**SCORES, "model": "demo_out/run/best"}))
    assert hub.run_files(model) == (scores, None)
