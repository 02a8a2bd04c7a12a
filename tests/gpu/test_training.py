"""Training on CUDA (skipped without it): the loss falls on the GPU while what a bundle stores stays on the
CPU; adaptation resumed from a checkpoint, bf16 zero-shot training and evaluation run there too."""

import pytest

import mhr
from tests.training.conftest import small_config
from training import suite
from training.adapt import adapt
from training.data import Example
from training.evaluate import evaluate_bundle
from training.pretrain import pretrain
from training.zeroshot import zeroshot

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def stored_tensors(bundle: mhr.Bundle) -> list:
    loras = [*bundle.adapters.values(), *([bundle.zero_shot] if bundle.zero_shot else [])]
    return [*bundle.lora_A.values(), *bundle.lora_B.values(), *bundle.routing.values(),
            *(t for lora in loras for t in [*lora.A.values(), *lora.B.values()])]


def test_train_adapt_zeroshot_eval_on_cuda(tiny_llama_path, tmp_path):
    examples = [ex for task in suite.TRAIN_TASKS[:4] for ex in suite.generate(task, 8, 0)]
    config = small_config(device=DEVICE, steps=20, batch_size=8, warmup_steps=2)
    bundle, result = pretrain(str(tiny_llama_path), examples, config, tmp_path / "b", progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.1, (first, last)
    assert {t.device.type for t in stored_tensors(bundle)} == {"cpu"}

    held = suite.HELD_OUT_TASKS[0]
    shots = suite.generate(held, 4, 0)
    resumable = dict(method="mhr", device=DEVICE, save_every=1, checkpoint_dir=str(tmp_path / "checkpoints"))
    adapt(tmp_path / "b", shots, held, small_config(steps=2, **resumable), progress=False)
    # the same run, longer: restores parameters, optimizer moments and the CUDA RNG on the GPU
    resumed = adapt(tmp_path / "b", shots, held, small_config(steps=3, **resumable), replace=True, progress=False)
    assert resumed.steps == 3 and len(resumed.losses) == 1
    zeroshot(tmp_path / "b", examples, small_config(method="mhr-mu", device=DEVICE, dtype="bf16", steps=2),
             progress=False)

    saved = mhr.Bundle.load(tmp_path / "b")
    assert saved.zero_shot is not None and held in saved.adapters
    ranked = Example(held, "pick one:", "yes", ("yes", "no"))
    report = evaluate_bundle(tmp_path / "b", [*suite.generate(held, 2, 0, split="test"), ranked], max_new_tokens=4,
                             device=DEVICE)
    assert report["tasks"][held]["n"] == 3 and {"accuracy", "exact_match", "loss"} <= set(report["tasks"][held])
