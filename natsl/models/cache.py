"""NAtSLCache (spec §1.8): a transformers `Cache` holding one inference state per layer, used by `generate()`.

natsl layers keep only their softmax-routed K/V plus fixed-size linear states (`NAtSLLayerState`); plain linear
layers keep convolution and recurrent states, plain softmax layers their full K/V. Layers find their state with
`layer_state(layer_idx, cls, **kwargs)` (created on first use); `Cache.update` is not used. `memory_report()`
shows the bytes held, split into softmax K/V (the `f·T` part) and linear states.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from natsl.layers.state import LinearLayerState, NAtSLLayerState, SoftmaxLayerState


class NAtSLCache(Cache):
    """Per-layer inference states of a natsl model (`NAtSLLayerState`, `LinearLayerState`, `SoftmaxLayerState`).

    Created empty (by the model when called with `use_cache=True`, or by the user); every layer adds its state on
    its first cached call. All layers advance together, so `get_seq_length()` is the number of tokens seen.
    Rolling back (`crop`) is not supported: natsl states are not croppable.
    """

    is_compileable = False

    def __init__(self):
        try:
            super().__init__(layers=[])
        except TypeError:  # transformers versions whose Cache takes no layer list
            super().__init__()
            self.layers = []

    def layer_state(self, layer_idx: int, cls: type, **kwargs):
        """The state of layer `layer_idx`, created as `cls(**kwargs)` on first use."""
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
        st = self.layers[layer_idx]
        if st is None:
            st = self.layers[layer_idx] = cls(**kwargs)
        elif not isinstance(st, cls):
            raise TypeError(f"layer {layer_idx} of the cache holds a {type(st).__name__}, the layer needs a {cls.__name__}")
        return st

    def _states(self):
        return [s for s in self.layers if s is not None]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        states = self._states()
        if layer_idx is not None and layer_idx < len(self.layers) and self.layers[layer_idx] is not None:
            return self.layers[layer_idx].seen_tokens
        return states[0].seen_tokens if states else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def update(self, *args, **kwargs):
        raise NotImplementedError("NAtSLCache is updated by natsl layers through layer_state(), not Cache.update")

    @property
    def batch_size(self) -> int:
        sizes = {s.batch_size for s in self._states() if s.batch_size >= 0}
        if len(sizes) > 1:
            raise ValueError(f"the batch size is not consistent across layers: {sorted(sizes)}")
        return sizes.pop() if sizes else -1

    @property
    def is_initialized(self) -> bool:
        return bool(self._states())

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        # False: generate() must slice the prompt by get_seq_length() (natsl layers hold K/V)
        return [False] * len(self.layers)

    def reset(self) -> None:
        self.layers = []

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("NAtSLCache cannot be cropped (natsl and linear states are not reversible)")

    def activate_past_recording(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for s in self._states():
            s.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for s in self._states():
            s.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for s in self._states():
            s.repeat_batch(repeats)

    def reserve(self, tokens: int) -> None:
        """Allocate the K/V storage of every layer for `tokens` more tokens now (e.g. `max_new_tokens` before
        decoding), so that decoding them never grows a buffer: no copy, no host read of the lengths, and a captured
        decode step (`natsl.GraphDecoder`) stays valid throughout."""
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        for st in self._states():
            st.reserve(tokens)

    def memory_report(self) -> dict:
        """Bytes held by the cache (one host sync per natsl layer).

        Returns:
            dict with
            `softmax_kv_bytes`: committed softmax-routed K/V of natsl layers (`f·T` rows per (batch, router head));
            `softmax_kv_allocated_bytes`: their storage including spare capacity and the current block;
            `full_kv_bytes` / `full_kv_allocated_bytes`: K/V of plain softmax layers (all `T` rows);
            `linear_state_bytes`: linear states of natsl and plain linear layers (independent of `T`);
            `other_bytes`: convolution states, router sums, lengths;
            `allocated_bytes`: everything allocated; `seen_tokens`; and `layers`, the same per layer.
        """
        rows = []
        for i, s in enumerate(self.layers):
            r = {"layer": i, "kind": None if s is None else type(s).__name__}
            if isinstance(s, NAtSLLayerState):
                r.update(softmax_kv_bytes=s.softmax_kv_bytes(), softmax_kv_allocated_bytes=s.softmax_kv_allocated_bytes(),
                         linear_state_bytes=s.linear_state_bytes(), other_bytes=s.other_bytes())
            elif isinstance(s, LinearLayerState):
                r.update(linear_state_bytes=s.linear_state_bytes(), other_bytes=s.other_bytes())
            elif isinstance(s, SoftmaxLayerState):
                r.update(full_kv_bytes=s.kv_bytes(), full_kv_allocated_bytes=s.kv_allocated_bytes())
            rows.append(r)
        keys = ("softmax_kv_bytes", "softmax_kv_allocated_bytes", "full_kv_bytes", "full_kv_allocated_bytes",
                "linear_state_bytes", "other_bytes")
        out = {k: sum(r.get(k, 0) for r in rows) for k in keys}
        out["allocated_bytes"] = (out["softmax_kv_allocated_bytes"] + out["full_kv_allocated_bytes"]
                                  + out["linear_state_bytes"] + out["other_bytes"])
        out["seen_tokens"] = self.get_seq_length()
        out["layers"] = rows
        return out
