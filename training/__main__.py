"""`python -m training` runs the `mhr` command line (what `torchrun -m training ...` starts)."""

from training.cli import main

main()
