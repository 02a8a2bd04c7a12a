"""Serving: many tasks of one MHR bundle from one backbone, behind an OpenAI-compatible HTTP API.

    http/          the HTTP layer: app and routes, the request gate (keys, body limits), the wire protocol,
                   serving logic (requests in, responses and streams out), admin deploys and uploads, metrics
    engine/        the torch engine: step loop, scheduler, requests and sequences, sampling, KV and prefix
                   caches, adapter slots and their cache, the task registry and serving inventory, outputs;
                   `engine.contract` is what the HTTP layer asks of any engine
    model/         the model side: the packed decoder forward, slot-aware linears, LoRA ops and the compiled
                   CPU kernels with their sources (csrc/)
    vllm_backend/  the vLLM engine, its adapter directories and vLLM's resolver plugin
    config.py      every setting of a serving process;  main.py  the `mhr serve` entry

Dependencies point down that list's reverse: http uses engine (through its contract), engine uses model;
nothing imports the HTTP layer but the entry point.
"""
