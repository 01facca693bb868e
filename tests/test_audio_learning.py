"""Learning test for image + audio fusion: on generated scenes whose captions need both inputs ("a red
circle and two high beeps"), one captioner trained with modality dropout is scored from both inputs,
from the image alone and from the sound alone, against most-frequent-caption baselines."""

from captioner.demo.runs import run_audio_demo


def test_both_inputs_beat_either_alone_and_each_beats_the_baseline(tmp_path):
    r = run_audio_demo(tmp_path / "demo", epochs=10, n_train=432, seed=0)
    print(f"audio learning test: CIDEr both {r.whole['both']:.4f}, image only {r.whole['image']:.4f}, "
          f"audio only {r.whole['audio']:.4f}, most frequent caption {r.whole['baseline']:.4f}; "
          f"parts: image {r.parts['image']:.4f} vs {r.parts['image baseline']:.4f}, "
          f"sound {r.parts['audio']:.4f} vs {r.parts['audio baseline']:.4f}")
    # The caption needs both inputs: with both it is clearly better than from either alone.
    assert r.whole["both"] > 1.2 * max(r.whole["image"], r.whole["audio"])
    # Each input alone still beats always answering the most frequent caption ...
    assert min(r.whole["image"], r.whole["audio"]) > 1.5 * r.whole["baseline"]
    # ... and gets its own half of the caption right, far above the most frequent half.
    assert r.parts["image"] > 2 * r.parts["image baseline"]
    assert r.parts["audio"] > 2 * r.parts["audio baseline"]
