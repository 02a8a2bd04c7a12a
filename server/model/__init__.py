"""The model side of the torch engine: the packed decoder forward, slot-aware linears, LoRA ops, CPU kernels."""
