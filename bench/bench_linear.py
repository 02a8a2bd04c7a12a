"""The backbone's linears on CPU: the compiled panel op against torch's `nn.Linear`, side by side.

    python -m bench.bench_linear [--rows 1 4 16 64 256 1024] [--repeats 15] [--threads 2]

Builds the reference workload's backbone's frozen linears (8 layers of q, k, v, o, gate, up, down and the
lm_head: ~118 MB float32, more than the last-level cache, so every pass reads them from memory) three
ways: `nn.Linear` with the weights as loaded, with the weights stored transposed (what the engine does
without the compiled kernels, `server.model.layers.column_major_weights`), and `server.model.layers.PanelLinear`
(the compiled op on weights packed once as column panels, what the engine runs on CPU). Times one pass
over all of them for each number of rows, the three taking turns, and prints medians, the weights read
per second and the ratios. Decode multiplies one row per running sequence; prefill many. Never asserts.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from bench.workload import REFERENCE_SHAPE
from server.model import cpu_kernel
from server.model.layers import PanelLinear, column_major_weights


def reference_linears() -> list[nn.Linear]:
    """The REFERENCE backbone's linears, random weights, in the order a forward uses them."""
    d, inter, layers, vocab = (REFERENCE_SHAPE[k] for k in ("hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "vocab_size"))
    shapes = [(d, d)] * 4 + [(d, inter)] * 2 + [(inter, d)]
    return [nn.Linear(i, o, bias=False) for _ in range(layers) for i, o in shapes] + [nn.Linear(d, vocab, bias=False)]


def systems(loaded: list[nn.Linear], op: Callable) -> dict[str, Callable[[dict[int, Tensor]], list[Tensor]]]:
    """One pass over `loaded` three ways, each a list of modules called as the model calls them; each takes
    inputs by input width and returns the outputs in order."""
    transposed = nn.ModuleList(copy.deepcopy(loaded))
    column_major_weights(transposed)
    ways = {"nn.Linear, weights as loaded": loaded, "nn.Linear, weights transposed": list(transposed),
            "PanelLinear (compiled op)": [PanelLinear(linear, op) for linear in loaded]}
    return {name: partial(run_all, modules) for name, modules in ways.items()}


def run_all(modules: list[nn.Module], xs: dict[int, Tensor]) -> list[Tensor]:
    return [m(xs[m.in_features]) for m in modules]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    op = cpu_kernel.panel_linear()
    if op is None:
        raise SystemExit("the compiled CPU kernels could not be built here (a C++ compiler is needed)")
    torch.manual_seed(0)
    loaded = reference_linears()
    megabytes = sum(linear.weight.numel() for linear in loaded) * 4 / 1e6
    runs = systems(loaded, op)
    print(f"{'rows':>6}" + "".join(f"{name:>32}" for name in runs) + f"{'panels / loaded':>18}"
          f"{'panels / transposed':>22}")
    with torch.inference_mode():
        for rows in args.rows:
            xs = {m.in_features: torch.randn(rows, m.in_features) for m in loaded}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats + 1):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(xs)
                    times[name].append(time.perf_counter() - start)
            ms = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}  # the first is warm-up
            cells = "".join(f"{f'{v:.2f} ms, {megabytes / v:.1f} GB/s':>32}" for v in ms.values())
            panel, plain, moved = ms["PanelLinear (compiled op)"], ms["nn.Linear, weights as loaded"], \
                ms["nn.Linear, weights transposed"]
            print(f"{rows:>6}{cells}{panel / plain:>18.2f}{panel / moved:>22.2f}")
    print(f"\nREFERENCE backbone's linears ({megabytes:.0f} MB float32), CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, medians of {args.repeats}")


if __name__ == "__main__":
    main()
