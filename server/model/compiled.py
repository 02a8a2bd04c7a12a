"""The lean decoder's decode step compiled with `torch.compile`, over a few static row buckets.

Owns running a step that only decodes (one new token for each running row, no prompt in it) through a
compiled `LeanDecoder.decode`: the rows are padded up to a bucket (powers of two up to `max_rows`), so the
step compiles once per bucket (`warm_up`, as the engine starts) and never again while serving; the attended
length is a dynamic dimension of the one graph (on CUDA rounded up to `kv_block` positions, so that each
bucket records a CUDA graph per block of lengths, `mode="reduce-overhead"`, not one per length).
Inductor fuses the elementwise work between the linears (residual + RMSNorm, SiLU·mul, rotary) into C++
loops on CPU and Triton kernels on CUDA; the CPU linears' compiled op (`server.model.cpu_kernel`) is called
from the graph as an opaque op, given a fake implementation here (`register_fake_ops`). Steps with prompts
in them (prefill, chunks) run the eager decoder, as does every step once a compilation has failed (logged).
Which rows run and their KV rows are the engine's business; padding rows read the empty slot 0 and write
position 0 of free KV rows, which nothing reads.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from server.engine.kv_cache import Attention, RowKVCache
from server.model.decoder import LeanDecoder, Part
from server.model.layers import SlotContext
from server.model.lora_ops import SlotPlan

log = logging.getLogger(__name__)


def row_buckets(max_rows: int) -> list[int]:
    """The padded row counts a decode step compiles for: the powers of two below `max_rows`, then `max_rows`."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    return [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows] + [max_rows]


def register_fake_ops() -> None:
    """Give the CPU linears' compiled op (when its library is loaded) a fake implementation, so the compiler
    traces through it: it returns nothing and writes its output `y` in place (its schema says so). Registering
    again replaces the same implementation."""
    if hasattr(torch.ops.mhr_serve, "panel_linear"):
        torch.library.register_fake("mhr_serve::panel_linear", _writes_its_output_only)


def _writes_its_output_only(y, x, panels, bias, A=None, B=None, slots=None) -> None:
    return None


class CompiledDecode:
    """`decoder`'s forward of a step's parts (as `LeanDecoder.__call__`), decode-only steps compiled.

    Args:
        decoder: the lean forward of the engine's model.
        context: the model's slot context (set here to the padded rows' plan for a compiled step).
        kv: the engine's KV cache (its buffers are the graph's, written in place).
        max_rows: the most rows a decode step has (the KV cache's running rows).
        kv_block: the attended length is rounded up to a multiple of this (default: 1 on CPU, 256 on CUDA).
    """

    def __init__(self, decoder: LeanDecoder, context: SlotContext, kv: RowKVCache, max_rows: int,
                 kv_block: int | None = None) -> None:
        register_fake_ops()
        self.decoder, self.context, self.kv = decoder, context, kv
        self.buckets = row_buckets(max_rows)
        self.cuda = kv.device.type == "cuda"
        self.kv_block = kv_block or (256 if self.cuda else 1)
        self.compile_seconds: dict[int, float] = {}   # per bucket: its first step's time (the compilation)
        self.failed = False
        if self.cuda:  # the cache is written inside the graph: a CUDA graph may mutate static inputs only
            for buffer in (*kv.keys, *kv.values):
                torch._dynamo.mark_static_address(buffer)
        self._step = torch.compile(decoder.decode, fullgraph=True, dynamic=False,
                                   mode="reduce-overhead" if self.cuda else None)

    def __call__(self, parts: list[Part], kv: RowKVCache) -> list[Tensor]:
        """Each part's logits [n, keep, V]: compiled when `parts` is one decode part, else eager."""
        part = parts[0]
        n = part.ids.shape[0]
        if (len(parts) > 1 or part.ids.shape[1] != 1 or part.keep != 1 or n > self.buckets[-1]
                or part.attention.mask.shape[-1] >= kv.max_len):  # the whole cache: see `_run`
            return self.decoder(parts, kv)
        logits = self._try(part, next(b for b in self.buckets if b >= n))
        return self.decoder(parts, kv) if logits is None else [logits[:n, None]]

    def warm_up(self) -> float:
        """Compile every bucket now, before serving (a step of padding rows each, which write into the KV
        cache's rows: none may be running); returns the seconds it took (logged)."""
        if self.kv.n_active:
            raise RuntimeError(f"warm_up runs before serving: {self.kv.n_active} KV rows are in use")
        start = time.perf_counter()
        none = torch.zeros(0, dtype=torch.long, device=self.kv.device)
        empty = Part(none[:, None], Attention(torch.ones(0, 1, 1, 2, dtype=torch.bool, device=none.device),
                                              none[:, None], ("decode", none, 0, 2)), SlotPlan(none, 0), 1)
        with torch.inference_mode():  # as the engine's steps run
            for bucket in self.buckets:
                if self._try(empty, bucket) is None:
                    break
        seconds = time.perf_counter() - start
        if not self.failed:
            log.info("decode step compiled for %s rows in %.1f s", ", ".join(map(str, self.buckets)), seconds)
        return seconds

    def _try(self, part: Part, bucket: int) -> Tensor | None:
        """`_run`, or None once a compilation has failed (logged when it fails): the eager decoder takes over."""
        if self.failed:
            return None
        try:
            return self._run(part, bucket)
        except Exception as e:  # noqa: BLE001 - whatever failed in the compiler: serve on, eagerly
            self.failed = True
            log.warning("compiling the decode step failed (%s: %s): decode steps run eagerly from now on",
                        type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
            return None

    def _run(self, part: Part, bucket: int) -> Tensor:
        """The compiled step of `part` (n rows) padded to `bucket` rows: logits [bucket, V]."""
        n = part.ids.shape[0]
        mask, positions, (_, write, _, _) = part.attention
        _, heads, max_len, _ = self.kv.keys[0].shape
        K = mask.shape[-1]
        K_padded = min(-(-K // self.kv_block) * self.kv_block, max_len - 1)
        padded_mask = torch.zeros(bucket, 1, 1, K_padded, dtype=torch.bool, device=mask.device)
        padded_mask[:n, ..., :K] = mask
        padded_mask[n:, ..., 0] = True                          # padding rows attend to what they write,
        pad_write = torch.arange(n * heads, bucket * heads, device=write.device) * max_len  # position 0 of its row
        # K's range is given, so no value in it recompiles: every row has a token, and the engine's K stays
        # below max_len (a request fits in max_len and its last token is never written); K = max_len would
        # make the slice of the cache contiguous, which the graph guards on, so such a step runs eagerly
        torch._dynamo.mark_dynamic(padded_mask, 3, min=2, max=max_len - 1)
        args = (_pad(part.ids[:, 0], bucket), _pad(positions[:, 0], bucket), torch.cat((write, pad_write)),
                padded_mask, SlotPlan(_pad(part.plan.rows, bucket), None), self.kv)
        plan, self.context.plan = self.context.plan, args[4]
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        start = time.perf_counter()
        try:
            logits = self._step(*args)
        finally:  # the step's own plan again (an eager forward after a failure reads it)
            self.context.plan = plan
        if bucket not in self.compile_seconds:
            self.compile_seconds[bucket] = time.perf_counter() - start
            log.debug("decode step compiled for %d rows in %.1f s", bucket, self.compile_seconds[bucket])
        return logits.clone() if self.cuda else logits  # a CUDA graph's output is overwritten by its next replay


def _pad(t: Tensor, size: int) -> Tensor:
    """`t` [n] with zeros after it up to [size]."""
    return torch.cat((t, t.new_zeros(size - t.shape[0])))
