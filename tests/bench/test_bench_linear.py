"""The linear benchmark's three systems compute the same outputs."""

import torch
from torch import nn

from bench.bench_linear import systems
from server.model import cpu_kernel


def test_every_system_computes_the_same_linears():
    op = cpu_kernel.panel_linear()
    assert op is not None, "the CPU kernels did not build: is a C++ compiler (g++) installed?"
    torch.manual_seed(0)
    linears = [nn.Linear(24, 40, bias=False), nn.Linear(40, 24, bias=False), nn.Linear(24, 70, bias=False)]
    xs = {24: torch.randn(5, 24), 40: torch.randn(5, 40)}
    want = [x @ m.weight.T for x, m in zip((xs[24], xs[40], xs[24]), linears, strict=True)]
    with torch.inference_mode():
        for name, run in systems(linears, op).items():
            got = run(xs)
            assert len(got) == 3 and all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True)), name

