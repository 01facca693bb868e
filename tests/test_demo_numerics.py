"""The demo's numbers do not depend on the machine's core count or the CPU's vector width."""

import os
import subprocess
import sys

import torch

from captioner.demo import numerics
from captioner.data import read_imagefolder
from captioner.demo.runs import demo_train_config, run_audio_demo, run_demo, run_scst_demo
from captioner.demo.tiny import train_tokenizer
from captioner.train.loop import train


def test_demo_training_does_not_depend_on_the_callers_thread_count(tmp_path, shapes_data):
    # Unpinned, one thread and three threads split each matrix product's sums differently and the
    # trained weights differ in their last bits (the full demo's CIDEr moved from 6.1030 to 5.9784).
    tokenizer = train_tokenizer([c for ex in read_imagefolder(shapes_data, "train")[0] for c in ex.captions])

    @numerics.with_pinned_threads
    def train_demo_model(out):
        assert torch.get_num_threads() == numerics.DEMO_THREADS
        config = demo_train_config(shapes_data, out, tokenizer, epochs=1, seed=0)
        config.val_images = 8
        return (train(config, tokenizer=tokenizer) / "model.safetensors").read_bytes()

    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            weights.append(train_demo_model(tmp_path / f"t{threads}"))
            assert torch.get_num_threads() == threads  # restored afterwards
    finally:
        torch.set_num_threads(before)
    assert weights[0] == weights[1]
    # and the demos run under the pin
    assert all(hasattr(demo, "__wrapped__") for demo in (run_demo, run_audio_demo, run_scst_demo))


def test_pin_kernels_fills_only_what_the_user_left_unset(monkeypatch):
    for name in numerics.KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    chosen = numerics.pin_kernels()
    assert "MKL_CBWR" not in chosen and os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_demo_command_pins_kernels_before_torch_loads(tmp_path):
    # The libraries read the variables when they load: pinning after `import torch` does nothing.
    code = ("import sys\n"
            "from captioner import cli\n"
            "import captioner.demo.numerics as n\n"
            "def probe():\n"
            "    print('torch loaded:', 'torch' in sys.modules)\n"
            "    raise SystemExit(0)\n"
            "n.pin_kernels = probe\n"
            f"cli.main(['demo', '--output-dir', {str(tmp_path / 'out')!r}])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.stdout.strip() == "torch loaded: False", out.stdout + out.stderr
