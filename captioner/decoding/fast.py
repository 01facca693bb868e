"""Fast decoding paths behind the same `Stepper` interface as `search.LMStepper`.

`StaticCacheStepper` keeps the KV cache in preallocated buffers (two taking turns on reorder; one fixed
buffer under `torch.compile`, so CUDA graphs apply); `PackedHead` runs the LM head on a oneDNN-prepacked
weight on CPU while decoding. Both give the same captions as the plain path (tested).
"""

from __future__ import annotations

import collections
import contextlib
import weakref

import torch

from captioner.decoding.search import LMStepper


class StaticCacheStepper(LMStepper):
    """KV-cached stepper whose cache is preallocated for the whole caption (prefix + max_new_tokens).

    A growing cache copies itself twice per step in beam search (reorder, then append); here a step
    writes its one new position in place, and a beam reorder is a single gather of the filled positions
    into a second buffer (`index_select(out=)`), the two buffers taking turns. Every step has the same
    shapes, which is what lets the step be compiled (`compile=True`: torch.compile; on CUDA with CUDA
    graphs, so a step is one graph launch instead of hundreds of kernel launches from Python). A compiled
    step always runs on the same buffer (CUDA graphs replay on fixed addresses): a reorder gathers into
    the second buffer and copies back. One instance serves many batches: buffers are kept per (rows,
    length, dtype, device), so compiled graphs are reused.

    The prefix is run uncompiled with a growing cache (its length varies), then gathered into a buffer by
    the first `select` (beam search's expansion to B * K rows) or the first `step`.

    Finished rows leave at chosen points only (`compact_to`): when at most half of the rows are live, the
    batch halves (B, ceil(B/2), ceil(B/4), ... rows, finished rows padding the count), so a batch size
    brings at most log2(B) + 1 step shapes to compile, not one per live count. A smaller row count uses the
    first rows of the same two buffers (views: no new memory; fixed addresses per shape for CUDA graphs).
    Buffers are kept for the `keep` most recent (length, dtype, device); a larger batch reallocates them.
    Not thread-safe: one decode at a time per instance."""

    RECOMPILE_LIMIT = 64  # compiled shapes (row counts) per process before new ones run uncompiled

    def __init__(self, lm: torch.nn.Module, *, max_new_tokens: int, compile: bool = False, keep: int = 2):
        super().__init__(lm, use_cache=True)
        self.max_new_tokens, self.keep = max_new_tokens, keep
        # (length, dtype, device) -> {rows: (StaticCache, StaticCache)}: views of the largest row count's pair
        self.caches: collections.OrderedDict[tuple, dict[int, tuple]] = collections.OrderedDict()
        self.cuda_graphs = False
        self.fixed_buffers = compile  # compiled steps always run on one buffer per row count
        self.forward = self.compiled = lm.forward
        if compile:
            cuda = next(lm.parameters()).is_cuda
            self.cuda_graphs = cuda
            self.compiled = torch.compile(lm.forward, mode="reduce-overhead" if cuda else None, fullgraph=True,
                                          dynamic=False)
            from torch._dynamo import config as dynamo_config
            from torch._dynamo.exc import FailOnRecompileLimitHit

            self.dynamo_config = dynamo_config

            self.over_limit = FailOnRecompileLimitHit

    def compact_to(self, live: int, now: int) -> int:
        """Rows (beam: images) to keep of `now` when `live` are needed: halve while half still holds them."""
        while now > 1 and live <= (now + 1) // 2:
            now = (now + 1) // 2
        return now

    def prefill(self, embeds):
        self.prefix_len = self.length = embeds.shape[1]  # positions filled so far (no GPU sync to learn it)
        return self._cached(inputs_embeds=embeds, logits_to_keep=1)  # a DynamicCache of the prefix

    def _pair(self, rows: int, state) -> tuple:
        from transformers import StaticCache

        like = state.layers[0].keys
        key = (self.prefix_len + self.max_new_tokens, like.dtype, like.device)
        if key in self.caches and rows > max(self.caches[key]):
            del self.caches[key]  # a larger batch than the buffers hold: new buffers
        if key not in self.caches:
            while len(self.caches) >= self.keep:  # bounded memory (each pair is 2 x the whole cache)
                self.caches.popitem(last=False)
            self.caches[key] = {}
        self.caches.move_to_end(key)
        views = self.caches[key]
        if rows not in views:
            full = views[max(views)] if views else None
            pair = tuple(StaticCache(config=self.lm.config, max_cache_len=key[0]) for _ in range(2))
            for i, cache in enumerate(pair):
                for j, d in enumerate(cache.layers):
                    if full is None:  # allocates (rows, heads, prefix + max_new_tokens, dim) zeros
                        s = state.layers[j]
                        d.lazy_initialization(*(x.new_empty(rows, x.shape[1], 1, x.shape[3])
                                                for x in (s.keys, s.values)))
                        continue
                    f = full[i].layers[j]  # a smaller row count: the first `rows` rows of the same buffers
                    d.lazy_initialization(f.keys[:0], f.values[:0])  # shapes and bookkeeping; 0 rows allocated
                    d.keys, d.values, d.batch_size = f.keys[:rows], f.values[:rows], rows
                    torch._dynamo.mark_static_address(d.keys)
                    torch._dynamo.mark_static_address(d.values)
            views[rows] = pair
        return views[rows]

    @staticmethod
    def _buffer(state, pair) -> int | None:
        """Which buffer of the pair `state` lives in (0, 1), or None (the prefix's growing cache)."""
        ptr = state.layers[0].keys.data_ptr()
        return next((i for i, c in enumerate(pair) if c.layers[0].is_initialized
                     and c.layers[0].keys.data_ptr() == ptr), None)

    def select(self, state, index):
        main, other = pair = self._pair(index.numel(), state)
        side = self._buffer(state, pair)
        if not self.fixed_buffers:  # the gather lands in the buffer `state` is not in
            target = main if side != 0 else other
            self._gather(state, target, index)
            return target
        # CUDA graphs replay on the addresses they were recorded with: the result always lands in `main`.
        if side == 0:
            self._gather(state, other, index)
            self._gather(other, main, None)
        else:
            self._gather(state, main, index)
        return main

    def _gather(self, src, dst, index: torch.Tensor | None) -> None:
        """Rows `index` (None: all, in order) of src's filled positions into dst; dst's next step writes
        position n."""
        n = self.length
        for s, d in zip(src.layers, dst.layers):  # (rows, heads, length, dim) each
            for a, b in ((s.keys, d.keys), (s.values, d.values)):
                if index is None:
                    b[:, :, :n].copy_(a[:, :, :n])
                else:
                    torch.index_select(a[:, :, :n], 0, index, out=b[:, :, :n])
            d.cumulative_length.fill_(n)

    def step(self, tokens, state):
        from transformers import StaticCache

        if not isinstance(state, StaticCache):
            state = self.select(state, torch.arange(tokens.shape[0], device=tokens.device))
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        ids = tokens.reshape(-1, 1).contiguous()  # (rows, 1): same strides every step, or compile re-traces
        kwargs = {"input_ids": ids, "use_cache": True, "logits_to_keep": 1, self.cache_kw: state}
        if self.compiled is self.forward:
            out = self.forward(**kwargs)
        else:
            try:
                # Each row count is one more compiled graph; past dynamo's limit a fullgraph compile raises
                # instead of falling back, so the limit is raised for our steps only (dynamo reads it when it
                # compiles, inside this call; the process-wide setting is left as it was) and an over-limit
                # shape runs uncompiled.
                with self.dynamo_config.patch(recompile_limit=self.RECOMPILE_LIMIT):
                    out = self.compiled(**kwargs)
            except self.over_limit:
                out = self.forward(**kwargs)  # one shape too many to compile: this one runs eagerly
        self.length += 1
        logits = out.logits[:, -1].float()
        return (logits.clone() if self.cuda_graphs else logits), state  # a graph's next replay overwrites its output


class PackedHead:
    """The LM head (the vocabulary projection: a third of GPT-2 124M's arithmetic per decoded token) run
    as oneDNN's GEMM on a prepacked copy of its weight, on CPU in float32. On this project's AVX2 machine
    that takes 89-94 ms instead of 133-151 ms at 160 rows x 50,257 tokens (a batch of 32 with 5 beams),
    ~10% of a decoding step; logits equal the plain matmul's to ~1e-6 (summation order).

    `applied(lm)` swaps the head's forward for the packed one while decoding and restores it on exit (the
    module is as before afterwards); the packed copy is made again whenever the weight changes (its
    version counter moves with every in-place update)."""

    def __init__(self):
        self.weight, self.version, self.packed = None, None, None  # weight: a weakref to what was packed

    @staticmethod
    def usable(lm: torch.nn.Module) -> bool:
        head = lm.get_output_embeddings()
        return (isinstance(head, torch.nn.Linear) and head.weight.device.type == "cpu"
                and head.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise") and not torch.is_grad_enabled())

    @contextlib.contextmanager
    def applied(self, lm: torch.nn.Module):
        if not self.usable(lm):
            yield
            return
        head = lm.get_output_embeddings()
        if self.weight is None or self.weight() is not head.weight or self.version != head.weight._version:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(head.weight.detach(), None)
            self.weight, self.version = weakref.ref(head.weight), head.weight._version

        def forward(x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V)
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, head.bias, "none", [], "")
            return out.view(*x.shape[:-1], out.shape[-1])

        forward.packed = True
        before = head.__dict__.get("forward")  # an outer applied() (nested decode) or someone else's
        head.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:
            # Set and restored: only our own forward is taken away, and what was there before comes back,
            # unless that is another decode's packed forward (interleaved threads: it may have ended, and a
            # packed copy left behind would go stale when the weights change). Both heads compute the same.
            if head.__dict__.get("forward") is forward:
                if before is None or getattr(before, "packed", False):
                    del head.forward
                else:
                    head.forward = before
