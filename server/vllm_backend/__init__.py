"""vLLM as the engine: the bundle's tasks served as PEFT LoRA directories, and vLLM's own server's resolver."""
