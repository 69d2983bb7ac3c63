"""Decoding with CUDA graphs (spec §1.8, issues 8 and 22): two captured model steps, one for the tokens inside a
routing block and one for the token that completes a block, replayed for every token.

Eager decoding is host-bound: a decode step of one natsl layer launches ~200 small kernels, and the host takes longer
to issue them than the GPU takes to run them (benchmarks/RESULTS.md, "Generation"). A step that does not complete a
routing block launches the same kernels at every position, because everything that depends on the position comes
from the states' device counters (`NAtSLLayerState.position`: the row a new key is written to, the rows a query
reads, RoPE positions) and no decision is taken on the host. `GraphDecoder` captures such a step once and replays it.

- The step that completes a block (router, commit or drop of the block's K/V, state update) is the second graph: the
  decision is a device tensor, the commit advances `lengths` on the device, and its only host work (the bound of
  `lengths` that `NAtSLLayerState.commit` keeps) advances by `block_size` whatever the routing, so the states
  advance it after a replay (`advance_replayed`). It is replayable while the K/V storage has room for one more
  block; a step that would grow a buffer (or of a plain softmax layer whose storage is full) runs eagerly.
  `generate()` reserves the storage for `max_new_tokens` after the prompt (`NAtSLCache.reserve`), so it never grows
  while decoding; with `step()`, call `cache.reserve(n)` yourself.
- Each kind of step runs eagerly once on the capture stream before it is captured (lazy initialisations, autotuning).
- After an eager step the states' new tensors are copied into the captured buffers, so the graphs stay valid. They
  are captured again only when a buffer changes shape (K/V growth) or the batch changes.
- Inside the captured step every state update is a copy into the buffer it replaces (one multi-tensor copy per
  dtype: a few kernels per step rather than one per state tensor).
- If the cache is changed outside the decoder between steps (`reorder_cache`, an eager model call), the next step
  copies the new tensors into the buffers first (or captures again if their shapes changed).

Example::

    decoder = GraphDecoder(model)                     # a CUDA NAtSLForCausalLM in eval mode
    ids = decoder.generate(prompt_ids, max_new_tokens=256)  # greedy; do_sample=True, top_p=0.9, ... to sample

    cache = NAtSLCache()                              # or step by step with your own sampling:
    logits = model(prompt_ids, cache=cache).logits
    for _ in range(n):
        next_ids = sample(logits[:, -1])              # [B, 1]
        logits = decoder.step(next_ids, cache)        # [B, 1, vocab]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from natsl.layers.state import LinearLayerState, NAtSLLayerState, SoftmaxLayerState
from natsl.models.cache import NAtSLCache


class CUDAGraphCapture:
    """Runs eager steps and captures graphs on one side stream of `device` (what `GraphDecoder` uses on CUDA)."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    def eager(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], torch.Tensor], torch.Tensor | None]:
        """`(replay, None)`: capturing runs the host code of `fn` but no kernel, so the caller replays once."""
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=self.stream):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay, None


def _state_tensors(states) -> dict:
    """`{(layer, name) or (layer, "conv", name): tensor}` of every tensor a layer state holds."""
    out = {}
    for i, st in enumerate(states):
        for name, val in vars(st).items():
            if isinstance(val, torch.Tensor):
                out[(i, name)] = val
            elif name == "conv":
                out.update({(i, "conv", n): x for n, x in val.items()})
    return out


def _set(states, key, val: torch.Tensor) -> None:
    if len(key) == 3:
        states[key[0]].conv[key[2]] = val
    else:
        setattr(states[key[0]], key[1], val)


class GraphDecoder:
    """Greedy or step-by-step decoding of a `NAtSLForCausalLM` that replays a captured step inside blocks.

    Args:
        model (NAtSLForCausalLM): in eval mode.
        capture (Optional): how steps are captured: an object with `eager(fn) -> out` and `capture(fn) -> (replay,
            out or None)`. Default: `CUDAGraphCapture` on the model's device (CUDA only).

    Attributes:
        captures, replays, eager_steps (int): counts since construction (both graphs together).
    """

    def __init__(self, model, capture=None):
        device = next(model.parameters()).device
        if capture is None:
            if device.type != "cuda":
                raise ValueError(f"GraphDecoder captures CUDA graphs: the model must be on a CUDA device, got {device}")
            capture = CUDAGraphCapture(device)
        self.model, self.capturer = model, capture
        self.captures = self.replays = self.eager_steps = 0
        self._drop()

    def _drop(self) -> None:
        self._replays, self._buffers, self._cache, self._ids = {}, None, None, None
        self._warm: set = set()  # the kinds of step run eagerly on the capture stream since (warm-ups before capture)

    def _kind(self, cache: NAtSLCache) -> str | None:
        """Which captured step this step is: `"inside"` (no block completes), `"complete"` (every natsl layer
        completes its block, with room to commit it), or `None` (eager: a buffer would grow, a state is missing)."""
        states = cache.layers
        if len(states) != len(self.model.model.layers) or any(s is None for s in states):
            return None
        kinds = set()
        for st in states:
            if isinstance(st, NAtSLLayerState):
                if not st.initialized:
                    return None
                if st.block_pos + 1 < st.block_size:
                    kinds.add("inside")
                elif st.commit_fits():
                    kinds.add("complete")
                else:
                    return None
            elif isinstance(st, SoftmaxLayerState):
                if st.k_rows is None or st.seen_tokens + 1 > st.capacity:
                    return None
            elif not isinstance(st, LinearLayerState) or st.state is None:
                return None
        if len(kinds) > 1:  # natsl layers of different block sizes
            return None
        return kinds.pop() if kinds else "inside"

    def _holds_buffers(self, states) -> bool:
        current = _state_tensors(states)
        return current.keys() == self._buffers.keys() and all(current[k] is b for k, b in self._buffers.items())

    def _adopt(self, states) -> None:
        """Copy the states' new tensors (after an eager step) into the captured buffers, or drop the graph if one
        no longer fits."""
        current = _state_tensors(states)
        if current.keys() != self._buffers.keys() or any(
                current[k].shape != b.shape or current[k].dtype != b.dtype for k, b in self._buffers.items()):
            self._drop()
            return
        self._copy_into_buffers(states, current)

    def _copy_into_buffers(self, states, current: dict) -> None:
        buffer_ids = {id(b) for b in self._buffers.values()}
        # a new value that is itself some buffer is read before any buffer is written
        current = {k: (v.clone() if v is not self._buffers[k] and id(v) in buffer_ids else v) for k, v in current.items()}
        keys = [key for key, buf in self._buffers.items() if current[key] is not buf]
        # one multi-tensor copy per dtype (a kernel or two per step instead of one per state tensor): its fast path
        # takes dense tensors of one dtype only, so strided views (the short-convolution states) are made dense
        groups: dict = {}
        for key in keys:
            groups.setdefault(self._buffers[key].dtype, []).append(key)
        for group in groups.values():
            torch._foreach_copy_([self._buffers[k] for k in group], [current[k].contiguous() for k in group])
        for key in keys:
            _set(states, key, self._buffers[key])

    def _capture(self, kind: str, input_ids: torch.Tensor, cache: NAtSLCache) -> torch.Tensor:
        states = cache.layers
        if self._buffers is None:  # the first graph: the states' tensors become the buffers both graphs use
            seen = set()
            for key, val in _state_tensors(states).items():  # every buffer its own storage (S and its run alias
                if id(val) in seen:                            # after a commit)
                    _set(states, key, val.clone())
                seen.add(id(val))
            self._buffers, self._cache, self._ids = _state_tensors(states), cache, input_ids.clone()
        else:
            self._ids.copy_(input_ids)

        def step() -> torch.Tensor:
            logits = self.model(self._ids, cache=cache).logits
            current = _state_tensors(states)
            if current.keys() != self._buffers.keys():
                raise RuntimeError("a decode step inside a block changed which tensors the cache holds")
            self._copy_into_buffers(states, current)
            return logits

        replay, out = self.capturer.capture(step)
        self._replays[kind] = replay
        self.captures += 1
        return replay() if out is None else out

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: NAtSLCache) -> torch.Tensor:
        """Continue `cache` by one token per row.

        Args:
            input_ids (torch.LongTensor): `[B, 1]`.
            cache (NAtSLCache): the model's cache after at least one (prefill) call.

        Returns:
            `logits [B, 1, vocab]` (a new tensor; the captured output buffer is reused by the next step).
        """
        if not isinstance(cache, NAtSLCache):
            raise TypeError(f"cache must be a natsl.models.cache.NAtSLCache, got {type(cache).__name__}")
        if input_ids.dim() != 2 or input_ids.shape[1] != 1 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer [B, 1] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        if self.model.training:
            raise ValueError("GraphDecoder needs the model in eval mode (call model.eval())")
        if cache.get_seq_length() == 0:
            raise ValueError("the cache is empty: run the prompt through the model with this cache first")
        if self._cache is not None and (cache is not self._cache or input_ids.shape != self._ids.shape):
            self._drop()
        kind = self._kind(cache)
        if kind is not None and self._buffers is not None and not self._holds_buffers(cache.layers):
            # the cache changed outside this decoder (reorder_cache, an eager model call): adopt its new tensors
            self.capturer.eager(lambda: self._adopt(cache.layers))
        if kind is not None and kind in self._warm:
            if kind not in self._replays:
                return self._capture(kind, input_ids, cache).clone()
            self._ids.copy_(input_ids)
            out = self._replays[kind]()
            for st in cache.layers:  # the host counters the captured step advanced when it was captured
                st.advance_replayed()
            self.replays += 1
            return out.clone()
        # eager: a buffer would grow, or the first step of its kind on the capture stream (the warm-up that runs its
        # lazy initialisations before a capture)
        if kind is not None:
            self._warm.add(kind)

        def eager() -> torch.Tensor:
            logits = self.model(input_ids, cache=cache).logits
            if self._buffers is not None:
                self._adopt(cache.layers)
            return logits

        self.eager_steps += 1
        return self.capturer.eager(eager)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode `max_new_tokens` tokens after `input_ids [B, T]` → `[B, T + max_new_tokens]`.

        Args:
            input_ids (torch.LongTensor): `[B, T]` the prompts.
            max_new_tokens (int): tokens to generate.
            do_sample (bool): sample from the (filtered) distribution instead of the argmax. Default: `False`.
            temperature (float): logits divided by it before sampling (> 0). Default: `1.0`.
            top_k (int, Optional): keep the `top_k` most likely tokens. Default: `None` (all).
            top_p (float, Optional): keep the smallest set of most likely tokens with probability ≥ `top_p` (nucleus,
                in (0, 1]). Default: `None`.
            eos_token_id (int, Optional): rows that produced it emit it again from then on (shapes stay fixed, so
                the captured steps stay valid). Default: `None`.
            generator (torch.Generator, Optional): random numbers of the sampling (on the model's device).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        cache = NAtSLCache()
        logits = self.model(input_ids, cache=cache).logits
        cache.reserve(max_new_tokens)  # no K/V growth while decoding: the captured steps stay valid
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            nxt = next_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator).to(input_ids.dtype)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self.step(out[-1], cache)
        return torch.cat(out, 1)


def next_token(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """`[B, vocab]` logits → `[B, 1]` next tokens: the argmax, or a sample after temperature, top-k and top-p."""
    if not do_sample:
        return logits.argmax(-1, keepdim=True)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus (the most likely one always stays)
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)
