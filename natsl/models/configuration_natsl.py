"""NAtSLConfig (spec §4): model dims, the per-layer layout and the NAtS-L layer arguments, JSON fields only."""

from __future__ import annotations

from transformers import PretrainedConfig

LAYER_KINDS = ("natsl", "linear", "softmax")

# layer arguments that NAtSLConfig stores under the same name as NAtSLAttention's keyword
ATTENTION_KEYS = ("hidden_size", "num_heads", "head_dim", "expand_v", "num_softmax_heads", "num_router_heads",
                  "block_size", "linear_backend", "softmax_backend", "linear_impl", "decode_attention",
                  "decay_through_softmax",
                  "router_sample", "router_temperature", "router_grad", "router_budget", "router_budget_weight",
                  "router_budget_scope",
                  "use_rope", "rope_theta", "conv_size", "norm_eps")

# the paper's model families (spec §1.1, §4): 21 layers, about 380M / 800M parameters with embeddings
_DIMS = {
    "340m": dict(hidden_size=1024, num_heads=6, head_dim=128, num_softmax_heads=12, num_router_heads=6,
                 num_attention_heads=16, num_hidden_layers=21),
    "760m": dict(hidden_size=1536, num_heads=6, head_dim=192, num_softmax_heads=18, num_router_heads=6,
                 num_attention_heads=24, num_hidden_layers=21),
    "tiny": dict(hidden_size=64, num_heads=2, head_dim=16, num_softmax_heads=4, num_router_heads=2,
                 num_attention_heads=4, num_hidden_layers=2, vocab_size=256, block_size=16, intermediate_size=128),
}
HYBRID_NATSL_LAYERS = (3, 7, 11, 15, 19, 20)
HYBRID_NUM_LAYERS = 21


class NAtSLConfig(PretrainedConfig):
    """Configuration of `NAtSLModel` / `NAtSLForCausalLM`.

    Args:
        vocab_size (int): Default: `32000`.
        hidden_size (int): Default: `1024`.
        num_hidden_layers (int): Default: `24`.
        layer_layout (list[str], Optional): one of `"natsl"`, `"linear"` (a plain linear layer of
            `linear_backend`), `"softmax"` (full attention) per layer. Default: all `"natsl"`.
        intermediate_size (int, Optional): SwiGLU width. Default: `8/3 · hidden_size` rounded up to 256.
        num_attention_heads (int): heads of full-softmax layers. Default: `16`.
        tie_word_embeddings (bool): Default: `False` (untied LM head, as in the paper).
        initializer_range (float): std of the normal init of linear and embedding weights. Default: `0.02`.
        prefill_chunk_size (int, Optional): with an inference cache, an input longer than this runs through the
            cache in pieces of this many tokens (chunked prefill: the activation memory of one piece; the same
            outputs as one call, spec §1.8). Default: `None` (one call).
        The remaining arguments are NAtSLAttention's (same names, same defaults: the paper's 340M layer) and reach
        every natsl layer through `attention_kwargs()`.
        decode_attention (str): the attention read of cached decode steps in natsl and full-softmax layers:
            `"sdpa"` or `"triton"` (`natsl.layers.state.attend_rows`). Default: `"sdpa"`.
    """

    model_type = "natsl"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 1024, num_hidden_layers: int = 24,
                 layer_layout: list[str] | None = None, intermediate_size: int | None = None,
                 num_attention_heads: int = 16, num_heads: int = 6, head_dim: int = 128, expand_v: float = 2,
                 num_softmax_heads: int = 12, num_router_heads: int = 6, block_size: int = 64,
                 linear_backend: str = "gdn", softmax_backend: str = "auto", linear_impl: str = "auto",
                 decode_attention: str = "sdpa", decay_through_softmax: bool = True, router_sample: str = "argmax",
                 router_temperature: float = 1.0,
                 router_grad: str = "selected", router_budget: float | None = None, router_budget_weight: float = 1.0,
                 router_budget_scope: str = "layer", use_rope: bool = False, rope_theta: float = 10000.0,
                 conv_size: int = 4, norm_eps: float = 1e-5,
                 initializer_range: float = 0.02, prefill_chunk_size: int | None = None,
                 tie_word_embeddings: bool = False, pad_token_id: int | None = None, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, **kwargs):
        layer_layout = list(layer_layout) if layer_layout is not None else ["natsl"] * num_hidden_layers
        if len(layer_layout) != num_hidden_layers:
            raise ValueError(f"layer_layout has {len(layer_layout)} entries but num_hidden_layers={num_hidden_layers}")
        bad = sorted({t for t in layer_layout if t not in LAYER_KINDS})
        if bad:
            raise ValueError(f"layer_layout entries must be in {LAYER_KINDS}, got {bad}")
        if intermediate_size is None:
            intermediate_size = 256 * -(-int(hidden_size * 8 / 3) // 256)
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.layer_layout, self.intermediate_size, self.num_attention_heads = layer_layout, intermediate_size, \
            num_attention_heads
        self.num_heads, self.head_dim, self.expand_v = num_heads, head_dim, expand_v
        self.num_softmax_heads, self.num_router_heads, self.block_size = num_softmax_heads, num_router_heads, block_size
        self.linear_backend, self.softmax_backend, self.linear_impl = linear_backend, softmax_backend, linear_impl
        self.decode_attention = decode_attention
        self.decay_through_softmax, self.router_sample = decay_through_softmax, router_sample
        self.router_temperature, self.router_grad = router_temperature, router_grad
        self.router_budget, self.router_budget_weight = router_budget, router_budget_weight
        self.router_budget_scope = router_budget_scope
        self.use_rope, self.rope_theta, self.conv_size, self.norm_eps = use_rope, rope_theta, conv_size, norm_eps
        self.initializer_range = initializer_range
        if prefill_chunk_size is not None and (not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1):
            raise ValueError(f"prefill_chunk_size must be None or a positive int, got {prefill_chunk_size!r}")
        self.prefill_chunk_size = prefill_chunk_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    def attention_kwargs(self) -> dict:
        """The NAtSLAttention arguments (all but `layer_idx`), taken from this config by name."""
        return {k: getattr(self, k) for k in ATTENTION_KEYS}

    def linear_kwargs(self) -> dict:
        """The arguments of the plain `LinearAttention` layers."""
        keys = ("hidden_size", "num_heads", "head_dim", "expand_v", "linear_backend", "linear_impl", "conv_size",
                "norm_eps")
        return {k: getattr(self, k) for k in keys}

    def softmax_kwargs(self) -> dict:
        """The arguments of the full `SoftmaxAttention` layers."""
        return {"hidden_size": self.hidden_size, "num_heads": self.num_attention_heads, "rope_theta": self.rope_theta,
                "decode_attention": self.decode_attention}

    @classmethod
    def preset(cls, size: str = "340m", family: str = "natsl", **overrides) -> NAtSLConfig:
        """A paper configuration.

        Args:
            size (str): `"340m"`, `"760m"` or `"tiny"` (tests and demos).
            family (str): `"natsl"` (NAtS-L in every layer), `"hybrid"` (the paper's NAtS-L Hybrid: 21 layers, natsl
                at 3, 7, 11, 15, 19, 20 and plain linear layers elsewhere; on `tiny`: natsl every other layer),
                `"linear"` (all plain linear layers), `"softmax"` (a Transformer), `"layer_hybrid"` (3 linear : 1
                softmax layers, the layer-level hybrid baseline).
            **overrides: any config field.
        """
        if size not in _DIMS:
            raise ValueError(f"size must be one of {tuple(_DIMS)}, got {size!r}")
        families = ("natsl", "hybrid", "linear", "softmax", "layer_hybrid")
        if family not in families:
            raise ValueError(f"family must be one of {families}, got {family!r}")
        kw = dict(_DIMS[size])
        n = overrides.pop("num_hidden_layers", kw["num_hidden_layers"])
        if family == "hybrid":
            if size == "tiny":
                types = ["linear" if i % 2 == 0 else "natsl" for i in range(n)]
            else:
                n = HYBRID_NUM_LAYERS
                types = ["natsl" if i in HYBRID_NATSL_LAYERS else "linear" for i in range(n)]
        elif family == "layer_hybrid":
            types = ["softmax" if i % 4 == 3 else "linear" for i in range(n)]
        else:
            types = [family] * n
        kw.update(num_hidden_layers=n, layer_layout=types)
        kw.update(overrides)
        return cls(**kw)

