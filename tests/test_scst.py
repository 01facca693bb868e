"""Tests for self-critical sequence training (train/scst.py) as a stage of the training loop: the pieces of the
loss (log-probabilities, baselines, rewards), the configuration, and learning tests on the shapes set. Fast:
from a 3-epoch cross-entropy checkpoint (not converged) the mean reward rises over the SCST steps, and the
start / +XE / +SCST test CIDEr is printed (there more cross-entropy still gains more). Slow (opt-in, minutes):
from a converged cross-entropy checkpoint, SCST against as many cross-entropy steps (README's SCST section)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from captioner.config import TrainConfig
from captioner.errors import ConfigError
from captioner.scoring.ciderd import DocumentFrequency
from captioner.train import scst as scst_mod
from captioner.train.scst import ScstStage, advantages

# Learning test recipe (eval/scst_noise.py runs it over seeds): the shapes demo's captioner after XE_EPOCHS
# epochs, then STEPS steps (160 captions each) of cross-entropy or of SCST (32 images x 5 samples).
XE_EPOCHS, STEPS, XE_LR, SCST_LR = 3, 30, 5e-4, 5e-4

# The comparison (slow: run with CAPTIONER_SLOW_TESTS=1; eval/scst_noise.py runs it over seeds): a shapes set of
# CMP_TRAIN training images (every colour x shape x size x position once), the demo's captioner trained
# CMP_EPOCHS epochs (lr 2e-3, cosine decay to 0: test CIDEr has plateaued), then CMP_STEPS full-batch steps
# (all CMP_TRAIN x 5 captions; SCST: all images x 5 samples, mean-of-others baseline), lr CMP_LR constant.
CMP_TRAIN, CMP_EPOCHS, CMP_STEPS, CMP_LR, CMP_BATCH = 120, 20, 20, 1e-4, 600


class _Acc:
    """The accelerator calls ScstStage makes, for one CPU process."""
    is_main_process, num_processes = True, 1

    def unwrap_model(self, model):
        return model

    def autocast(self):
        import contextlib
        return contextlib.nullcontext()


class _Ex:
    def __init__(self, captions):
        self.captions = captions


def stage(captioner, tmp_path, **config):
    cfg = TrainConfig(scst=True, output_dir=str(tmp_path), **config)
    examples = [_Ex(["a red circle at the top left", "a red circle"]), _Ex(["a blue square in the center"])]
    return ScstStage(cfg, captioner, examples, tmp_path, accelerator=_Acc())


def test_advantages_mean_of_the_other_samples_and_greedy():
    reward = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    assert torch.allclose(advantages(reward), torch.tensor([[-1.5, 0.0, 1.5], [-2.0, -2.0, 4.0]]))
    assert torch.allclose(advantages(reward, torch.tensor([2.0, 1.0])), torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 3.0]]))


def one_image_stage(make_captioner, tmp_path):
    """A tiny captioner, its SCST stage, EOS id, and the features + presence mask of one random image."""
    cap = make_captioner()
    feats = {"image": torch.randn(1, cap.model.encoders["image"].output_dim)}
    return cap, stage(cap, tmp_path), cap.tokenizer.eos_token_id, feats, {"image": torch.ones(1, dtype=torch.bool)}


def test_sequence_logprobs_count_tokens_up_to_the_first_eos_only(make_captioner, tmp_path):
    cap, st, eos, feats, present = one_image_stage(make_captioner, tmp_path)
    a = torch.tensor([[5, 7, eos, 9, 11], [5, 7, eos, 12, 3]])  # the same caption, different padding
    cap.model.eval()
    with torch.no_grad():
        got = st.sequence_logprobs(cap.model, feats, present, a)
        logits = cap.model(feats, a[:1, :3], torch.ones(1, 3, dtype=torch.long)).logits[0].float()
    want = logits.log_softmax(-1).gather(1, a[0, :3, None]).sum()  # EOS included
    assert torch.allclose(got, want.expand(2), atol=1e-5)


def test_a_step_raises_the_log_probability_of_samples_above_the_baseline(make_captioner, tmp_path):
    cap, st, eos, feats, present = one_image_stage(make_captioner, tmp_path)
    tokens = torch.tensor([[5, 7, eos], [9, 11, eos]])
    advantage = torch.tensor([1.0, -1.0])
    cap.model.eval()  # no dropout: the change comes from the step alone
    before = st.sequence_logprobs(cap.model, feats, present, tokens).detach()
    opt = torch.optim.SGD([p for p in cap.model.parameters() if p.requires_grad], lr=0.05)
    (-(advantage * st.sequence_logprobs(cap.model, feats, present, tokens)).mean()).backward()
    opt.step()
    change = st.sequence_logprobs(cap.model, feats, present, tokens).detach() - before
    assert change[0] > 0 > change[1]


def test_rewards_are_ciderd_against_the_items_references_with_cached_df(make_captioner, tmp_path):
    cap = make_captioner()
    st = stage(cap, tmp_path)
    df = DocumentFrequency.load(tmp_path / scst_mod.DF_FILE)  # cached beside the run
    assert df.num_docs == 2 and df.df[("red", "circle")] == 1
    ids = cap.tokenizer(["a red circle at the top left", "a blue square in the center"])["input_ids"]
    eos = cap.tokenizer.eos_token_id
    width = max(map(len, ids)) + 1
    tokens = torch.tensor([row + [eos] * (width - len(row)) for row in ids])  # EOS, then EOS as padding
    r = st.rewards(tokens, [0, 0])  # both against item 0's references
    assert r[0] > 1.0 and r[1] < r[0]
    assert st.rewards(tokens[1:], [1])[0] > r[1]  # the blue square is item 1's caption


def test_clip_reward_adds_weighted_clipscore(make_captioner, tmp_path):
    cap = make_captioner()

    class FakeClip:  # text embeddings chosen so cos(image, text) is known
        weight, prompt = 2.5, "A photo depicts "

        def text_embeddings(self, texts):
            return torch.tensor([[1.0, 0.0], [0.0, 1.0]])[: len(texts)]

    cfg = TrainConfig(scst=True, output_dir=str(tmp_path), clip_reward_weight=0.4)
    st = ScstStage(cfg, cap, [_Ex(["a red circle"])], tmp_path, accelerator=_Acc(), clip_scorer=FakeClip())
    eos = cap.tokenizer.eos_token_id
    tokens = torch.tensor([[eos], [eos]])  # empty captions: CIDEr-D 0, only the CLIP part
    r = st.rewards(tokens, [0, 0], torch.tensor([[3.0, 4.0], [3.0, 4.0]]))  # cos = 0.6 and 0.8
    assert torch.allclose(r, torch.tensor([0.4 * 2.5 * 0.6, 0.4 * 2.5 * 0.8]))


def test_clip_reward_refuses_a_random_clip_tower(make_captioner, tmp_path):
    with pytest.raises(ConfigError, match="pretrained"):
        stage(make_captioner(), tmp_path, clip_reward_weight=1.0)


def test_config_checks():
    with pytest.raises(ConfigError, match="mean or greedy"):
        TrainConfig(scst_baseline="best")
    with pytest.raises(ConfigError, match="scst_samples >= 2"):
        TrainConfig(scst=True, scst_samples=1)
    TrainConfig(scst=True, scst_samples=1, scst_baseline="greedy")


# ------------------------------------------------------------------ learning test


@pytest.fixture(scope="module")
def scst_demo(shapes_data, tmp_path_factory):
    from captioner.demo.runs import run_scst_demo

    return run_scst_demo(tmp_path_factory.mktemp("scst"), data=shapes_data, xe_epochs=XE_EPOCHS, steps=STEPS,
                         xe_lr=XE_LR, scst_lr=SCST_LR)


def test_mean_reward_rises_over_the_scst_steps(scst_demo):
    r = scst_demo
    print(f"\ntest CIDEr: start {r.start:.3f}, +{STEPS} XE steps {r.xe:.3f}, +{STEPS} SCST steps {r.scst:.3f}; "
          f"seconds/step XE {r.seconds_per_step['xe']:.3f} SCST {r.seconds_per_step['scst']:.3f}")
    rewards = r.rewards
    q = STEPS // 3
    print(f"mean reward: first {q} steps {sum(rewards[:q]) / q:.3f}, last {q} steps {sum(rewards[-q:]) / q:.3f}")
    assert len(rewards) == STEPS and all(math.isfinite(x) for x in rewards)
    assert sum(rewards[-q:]) / q > sum(rewards[:q]) / q + 0.1  # measured +0.39 (seed 0), +0.25 (seed 1)
    assert r.scst > r.start - 0.5  # SCST does not wreck the captioner it starts from


def test_scst_run_caches_df_and_picks_best_by_validation_cider(scst_demo):
    run = scst_demo.runs["scst"]
    df = DocumentFrequency.load(run / scst_mod.DF_FILE)
    assert df.num_docs == 360  # the shapes set's training images
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line]
    assert any("val_cider" in r for r in records) and any(r.get("reward", 0) > 0 for r in records)  # CIDEr-D rewards were computed
    assert (run / "best" / "config.json").exists()
    assert json.loads((run / "train_config.json").read_text())["scst"] is True


def test_cli_scst_defaults_and_init_from_guard(scst_demo, shapes_data, tmp_path):
    from captioner.cli import main

    base = scst_demo.runs["base"] / "last"
    out = tmp_path / "run"
    argv = ["train", "--scst", "--init-from", str(base), "--data", str(shapes_data), "--output-dir", str(out),
            "--max-steps", "1", "--batch-size", "10", "--val-split", "none", "--feature-cache",
            str(scst_demo.runs["base"].parent / "features")]
    assert main(argv) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["lr"] == 1e-5 and config["epochs"] == 3  # SCST's defaults under the flags
    assert config["model"]["lm_config"] is not None  # the model comes from init_from
    inside = ["train", "--scst", "--init-from", str(out / "last"), "--data", str(shapes_data), "--output-dir",
              str(out), "--overwrite", "--max-steps", "1"]
    assert main(inside) == 2  # one-line error: overwrite would remove the captioner it starts from
    assert (out / "last" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CAPTIONER_SLOW_TESTS") != "1",
                    reason="minutes of CPU: run with CAPTIONER_SLOW_TESTS=1")
def test_scst_from_a_converged_base_against_as_many_cross_entropy_steps(tmp_path):
    from captioner.demo.runs import run_scst_demo
    from captioner.demo.shapes import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", n_train=CMP_TRAIN, n_val=30, n_test=60, seed=1)
    r = run_scst_demo(tmp_path, data=data, xe_epochs=CMP_EPOCHS, steps=CMP_STEPS, xe_lr=CMP_LR, scst_lr=CMP_LR,
                      batch_size=CMP_BATCH)
    print(f"\ntest CIDEr: start {r.start:.3f}, +{CMP_STEPS} XE steps {r.xe:.3f}, +{CMP_STEPS} SCST steps {r.scst:.3f}")
    q = CMP_STEPS // 3
    assert sum(r.rewards[-q:]) / q > sum(r.rewards[:q]) / q  # measured +0.26 / +0.20 / +0.21 (seeds 0 / 1 / 2)
    assert r.scst > r.start  # measured 4.279 -> 4.624 / 4.329 / 4.412 (seeds 0 / 1 / 2)
    # Not asserted: SCST above +XE. Measured over continuation seeds 0 / 1 / 2, +XE 4.376 / 4.478 / 4.474,
    # +SCST 4.624 / 4.329 / 4.412: the difference (+0.25 / -0.15 / -0.06) is within
    # the run-to-run noise (README's SCST section).
