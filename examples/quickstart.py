"""Quick start of the core library on a tiny Llama built locally (no download).

Injects an MHR inventory into the model, routes two tasks through one batch, writes a bundle, loads it
back, materializes a task into an ordinary LoRA and exports it in the PEFT format.

    python examples/quickstart.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mhr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write the bundle (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mhr-quickstart-"))

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2)).eval()
    config = mhr.MHRConfig(n_skills=4, n_heads=2, rank=4, alpha=8.0,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    tasks = ["reverse", "uppercase", "sort"]
    layers = mhr.inject(model, config, n_tasks=len(tasks))
    with torch.no_grad():  # stand-in for training: give skills and routing something to show
        for layer in layers.values():
            layer.lora_B.normal_(std=1.0)
            layer.router.logits.normal_(std=2.0)
    print(f"adapted {len(layers)} linear layers, e.g. {next(iter(layers))}")

    prompt = torch.tensor([[1, 17, 42, 99, 7]] * 2)
    with mhr.use_tasks(model, [0, 1]):  # row 0 runs task 'reverse', row 1 task 'uppercase'
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print("greedy tokens per task:", {tasks[i]: generated[i, 5:].tolist() for i in range(2)})

    bundle = mhr.Bundle.from_model(model, config, backbone="tiny-llama (built locally)", tasks=tasks)
    bundle.save(out / "bundle")
    loaded = mhr.Bundle.load(out / "bundle", model=model)
    print(f"bundle at {out / 'bundle'}: tasks {loaded.task_names}")

    lora = loaded.task_lora("sort")
    name = next(iter(lora.modules))
    print(f"materialized 'sort': rank {lora.rank}, {name}: A {list(lora.A[name].shape)}, "
          f"B {list(lora.B[name].shape)}")
    weights = mhr.routing_weights(loaded.routing_logits("sort")[name])
    print(f"its routing weights in {name} (heads x skills):\n{weights.numpy().round(2)}")
    peft_dir = mhr.export_peft(lora, out / "sort-peft", base_model_name_or_path="tiny-llama")
    print(f"exported as a PEFT LoRA: {sorted(p.name for p in peft_dir.iterdir())}")


if __name__ == "__main__":
    main()
