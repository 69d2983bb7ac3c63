"""NAtSLModel and NAtSLForCausalLM (spec §4): pre-norm blocks mixing natsl, plain linear and softmax layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from natsl.layers.baselines import LinearAttention, SoftmaxAttention
from natsl.layers.fused import RMSNorm, SwiGLU, cross_entropy
from natsl.layers.natsl_attention import NAtSLAttention, NAtSLLayerStats
from natsl.models.cache import NAtSLCache
from natsl.models.configuration_natsl import NAtSLConfig


class NAtSLBlock(GradientCheckpointingLayer):
    """RMSNorm → mixer → residual → RMSNorm → SwiGLU → residual (the second residual add fused into its norm).

    With `model.gradient_checkpointing_enable()` (transformers' activation checkpointing; natsl's default is the
    non-reentrant `torch.utils.checkpoint`, which carries the router-budget term's gradient too) each block keeps
    only its input for the backward and recomputes the rest."""

    def __init__(self, config: NAtSLConfig, layer_idx: int):
        super().__init__()
        kind = config.layer_layout[layer_idx]
        self.layer_type = kind
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if kind == "natsl":
            self.attn = NAtSLAttention(**config.attention_kwargs(), layer_idx=layer_idx)
        elif kind == "linear":
            self.attn = LinearAttention(**config.linear_kwargs(), layer_idx=layer_idx)
        else:
            self.attn = SoftmaxAttention(**config.softmax_kwargs(), layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, cache: NAtSLCache | None = None):
        h, stats, _ = self.attn(self.attn_norm(x), past_key_values=cache, use_cache=cache is not None,
                                cu_seqlens=cu_seqlens)
        h, x = self.mlp_norm(h, residual=x, prenorm=True)
        return x + self.mlp(h), stats


@dataclass
class NAtSLModelOutput(ModelOutput):
    """`routing_stats`: per layer, the NAtSLLayerStats of natsl layers and `None` for the others."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    routing_stats: list | None = None
    router_aux_loss: torch.Tensor | None = None
    cache: NAtSLCache | None = None

    @property
    def past_key_values(self) -> NAtSLCache | None:
        return self.cache


@dataclass
class NAtSLCausalLMOutput(ModelOutput):
    """`loss` includes the router-budget term when the budget is on; `lm_loss` is the cross-entropy alone (fla's
    fused cross-entropy on CUDA, over the logits in their own dtype)."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    routing_stats: list | None = None
    router_aux_loss: torch.Tensor | None = None
    cache: NAtSLCache | None = None

    @property
    def past_key_values(self) -> NAtSLCache | None:
        return self.cache


class NAtSLPreTrainedModel(PreTrainedModel):
    config_class = NAtSLConfig
    base_model_prefix = "model"
    _no_split_modules = ["NAtSLBlock"]
    supports_gradient_checkpointing = True

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # older transformers: reentrant default
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
            """Recompute each block in the backward. Default `{"use_reentrant": False}` (newer transformers'
            default too): the block also returns the router statistics, whose budget term needs the non-reentrant
            checkpoint to carry a gradient."""
            kw = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
            return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """`[1, T]` positions that restart at 0 at every sequence start → `cu_seqlens [N_seq + 1]`."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError("packed position_ids must have shape [1, T] (sequences concatenated in one row)")
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        raise ValueError("packed position_ids must start at 0")
    return torch.cat([starts, starts.new_tensor([pos.numel()])])


class NAtSLModel(NAtSLPreTrainedModel):
    def __init__(self, config: NAtSLConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList([NAtSLBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                use_cache: bool | None = None, past_key_values: NAtSLCache | None = None,
                cache: NAtSLCache | None = None, **kwargs) -> NAtSLModelOutput:
        """Args:
            input_ids (torch.LongTensor): `[B, T]` (or `inputs_embeds [B, T, D]`).
            attention_mask (torch.Tensor, Optional): `[B, T]` (with a cache: `[B, past + T]`); only all-ones (no
                padding) is supported — pack variable-length batches with `cu_seqlens` or restarting
                `position_ids` instead (training only: generation takes unpadded batches of equal length).
            cu_seqlens (torch.LongTensor, Optional): `[N_seq + 1]` packed offsets (`B == 1`; not with a cache).
            position_ids (torch.LongTensor, Optional): `[1, T]`, restarting at 0 at each packed sequence.
            use_cache (bool, Optional): continue (or start) an inference cache and return it as `cache`.
            cache / past_key_values (NAtSLCache, Optional): the inference cache to continue (spec §1.8); the
                call appends its `T` tokens to it.
        """
        if kwargs:
            raise TypeError(f"NAtSLModel.forward got unexpected arguments {sorted(kwargs)}")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the inference cache once (as cache or as past_key_values)")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = NAtSLCache()
        if cache is not None and not isinstance(cache, NAtSLCache):
            raise TypeError(f"natsl models need a natsl.models.cache.NAtSLCache, got {type(cache).__name__}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        # a one-token step of a cache is not re-checked (that would be a host sync per decoded token): generate()
        # only appends ones to the mask it checked at the prefill
        check_mask = cache is None or x.shape[1] > 1 or cache.get_seq_length() == 0
        if attention_mask is not None and check_mask and not bool(attention_mask.bool().all()):
            if cache is not None:
                raise ValueError("natsl generation does not support padded batches (attention_mask with zeros, e.g. "
                                 "left padding): generate prompts of different lengths separately")
            raise ValueError("natsl models do not support padded batches (attention_mask with zeros); pack the "
                             "sequences with cu_seqlens (or restarting position_ids) instead")
        if cache is not None:
            if cu_seqlens is not None or (position_ids is not None and x.shape[1] > 1
                                          and bool((position_ids[:, 1:] <= position_ids[:, :-1]).any())):
                raise ValueError("packed prompts (cu_seqlens or restarting position_ids) cannot be used with an "
                                 "inference cache; generate each sequence separately or as an unpadded batch")
        elif cu_seqlens is None and position_ids is not None and x.shape[0] == 1 and \
                bool((position_ids[0, 1:] == 0).any()):
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)
        chunk = self.config.prefill_chunk_size
        if cache is not None and chunk and x.shape[1] > chunk:  # chunked prefill: the same rows, bounded memory
            pieces, touched, C = [], [], self.config.block_size
            for i in range(0, x.shape[1], chunk):
                t0, n = cache.get_seq_length(), min(chunk, x.shape[1] - i)
                touched.append((t0 + n - 1) // C - t0 // C + 1)
                pieces.append(self._layers(x[:, i:i + n], None, cache, output_hidden_states))
            x = torch.cat([p[0] for p in pieces], 1)
            hidden = [torch.cat(h, 1) for h in zip(*[p[1] for p in pieces])] if output_hidden_states else []
            stats = [_merge_chunk_stats([p[2][i] for p in pieces], touched) for i in range(len(self.layers))]
        else:
            x, hidden, stats = self._layers(x, cu_seqlens, cache, output_hidden_states)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        aux = [s.router_aux_loss for s in stats if s is not None and s.router_aux_loss is not None]
        return NAtSLModelOutput(last_hidden_state=x, hidden_states=tuple(hidden) if output_hidden_states else None,
                                routing_stats=stats, router_aux_loss=torch.stack(aux).sum() if aux else None,
                                cache=cache)

    def _layers(self, x, cu_seqlens, cache, output_hidden_states):
        """The blocks over `x [B, T, D]`: `(x before the final norm, hidden states per layer, stats per layer)`."""
        hidden, stats = [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x, s = layer(x, cu_seqlens=cu_seqlens, cache=cache)
            stats.append(s)
        return x, hidden, stats


def _merge_chunk_stats(parts: list, touched: list[int]):
    """One natsl layer's statistics over the pieces of a chunked prefill: the softmax fraction averaged over the
    pieces that routed blocks, weighted by the blocks each touched; `None` for other layers or if none routed."""
    got = [(p, w) for p, w in zip(parts, touched) if p is not None]
    if not got:
        return None
    total = sum(w for _, w in got)
    frac = sum(p.softmax_fraction * w for p, w in got) / total
    return NAtSLLayerStats(softmax_fraction=frac)


class NAtSLForCausalLM(NAtSLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}
    # generate() must not build a DynamicCache (the model creates its NAtSLCache) nor roll the cache back
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def __init__(self, config: NAtSLConfig):
        super().__init__(config)
        self.model = NAtSLModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, use_cache: bool | None = None, past_key_values=None,
                logits_to_keep: int = 0, return_dict: bool | None = None, cache: NAtSLCache | None = None,
                **kwargs) -> NAtSLCausalLMOutput:
        """Causal LM forward. `labels [B, T]` are shifted inside (position t predicts t+1); `-100` is ignored;
        with packed input no position predicts across a sequence boundary. With `use_cache=True` or a `cache`
        (`NAtSLCache`, alias `past_key_values`) the call continues the cached sequence and returns the cache."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                         cu_seqlens=cu_seqlens, position_ids=position_ids, output_hidden_states=output_hidden_states,
                         use_cache=use_cache, past_key_values=past_key_values, cache=cache, **kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = lm_loss = None
        if labels is not None:
            # position t predicts t+1: the last position (and, packed, each sequence's last token) predicts nothing
            target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
            if cu_seqlens is None and position_ids is not None and labels.shape[0] == 1 and \
                    bool((position_ids[0, 1:] == 0).any()):
                cu_seqlens = cu_seqlens_from_position_ids(position_ids)
            if cu_seqlens is not None:
                target[:, cu_seqlens[1:-1].to(target.device) - 1] = -100
            lm_loss = cross_entropy(logits.flatten(0, 1), target[:, target.shape[1] - h.shape[1]:].flatten())
            loss = lm_loss if out.router_aux_loss is None else lm_loss + out.router_aux_loss
        return NAtSLCausalLMOutput(loss=loss, lm_loss=lm_loss, logits=logits, hidden_states=out.hidden_states,
                                   routing_stats=out.routing_stats, router_aux_loss=out.router_aux_loss,
                                   cache=out.cache)

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """transformers' `generate()`; greedy decoding on CUDA replays `natsl.GraphDecoder`'s captured steps.

        The graph path is taken for `input_ids [B, T]` of a model in eval mode on CUDA, with `max_new_tokens` given
        and greedy search (`do_sample` off, one beam, one sequence) and no other generation option than
        `eos_token_id` / `pad_token_id`. The output is what transformers' greedy search returns: after a row's
        end-of-sequence token it holds `pad_token_id`, and it ends when every row has finished. Everything else
        (sampling, beams, logits processors, `return_dict_in_generate`, ...) runs transformers' own loop, which is
        eager and host-bound on a GPU; `GraphDecoder.generate` also samples with graphs.
        """
        if inputs is None and isinstance(kwargs.get("input_ids"), torch.Tensor):
            inputs = kwargs.pop("input_ids")
        graph = _graph_generate_args(self, inputs, generation_config, kwargs)
        decoder = None if graph is None else _graph_decoder(self)
        if decoder is None:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        max_new, eos, pad = graph
        out = decoder.generate(inputs, max_new)
        if eos is None:
            return out
        T, new = inputs.shape[1], out[:, inputs.shape[1]:]
        is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
        seen = is_eos.cumsum(1)  # [B, n]: end-of-sequence tokens of the row up to this step
        new = new.masked_fill(seen - is_eos.long() > 0, pad)  # a row's tokens after its first end-of-sequence
        all_done = (seen > 0).all(0)
        if bool(all_done.any()):  # transformers stops at the step where the last row finishes
            new = new[:, :int(all_done.nonzero()[0]) + 1]
        return torch.cat([out[:, :T], new], 1)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen (all of them without a cache). Padding masks are passed on
        so that the forward rejects them; packed-prompt arguments (`cu_seqlens`, `position_ids`) likewise."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"use_cache": use_cache, "attention_mask": attention_mask}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        if cache is not None:
            inputs["cache"] = cache
        if kwargs.get("cu_seqlens") is not None:
            inputs["cu_seqlens"] = kwargs["cu_seqlens"]
        if kwargs.get("position_ids") is not None:
            inputs["position_ids"] = kwargs["position_ids"][..., past:]
        return inputs

    def softmax_fractions(self, output: NAtSLCausalLMOutput) -> dict[int, torch.Tensor]:
        """Per natsl layer index, the `[H_R]` softmax fraction of that forward."""
        return {i: s.softmax_fraction for i, s in enumerate(output.routing_stats) if s is not None}


# the generation options of `NAtSLForCausalLM.generate`'s graph path; any other option set away from its default
# runs transformers' own loop
# (sampling-only options are ignored by greedy search: transformers' own loop ignores them too)
_GRAPH_GENERATE_OPTIONS = frozenset({"max_new_tokens", "max_length", "do_sample", "num_beams", "num_return_sequences",
                                     "eos_token_id", "pad_token_id", "bos_token_id", "use_cache",
                                     "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
                                     "eta_cutoff", "_from_model_config", "transformers_version"})


def _same_option(value, default) -> bool:
    unset = (None, False, [], {}, ())
    return value == default or (value in unset and default in unset)


def _graph_decoder(model):
    """The `GraphDecoder` of `NAtSLForCausalLM.generate`'s graph path, or `None` off CUDA (tests substitute one with an
    emulated capture)."""
    from natsl.models.graphs import GraphDecoder

    return GraphDecoder(model) if next(model.parameters()).device.type == "cuda" else None


def _graph_generate_args(model, inputs, generation_config, kwargs) -> tuple | None:
    """`(max_new_tokens, eos ids or None, pad id)` when `generate()`'s options allow `GraphDecoder`, else `None`."""
    import copy

    from transformers import GenerationConfig

    if model.training or not isinstance(inputs, torch.Tensor):
        return None
    if inputs.dim() != 2 or inputs.dtype not in (torch.int32, torch.int64) or inputs.shape[1] == 0:
        return None
    defaults = GenerationConfig().to_dict()
    extra = set(kwargs) - {"attention_mask"} - set(defaults)
    if extra or (kwargs.get("attention_mask") is not None and not bool(kwargs["attention_mask"].bool().all())):
        return None
    config = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k != "attention_mask"})
    if any(not _same_option(v, defaults.get(k)) for k, v in config.to_dict().items() if k not in _GRAPH_GENERATE_OPTIONS):
        return None
    if config.do_sample or (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
        return None
    if config.use_cache is False or not isinstance(config.max_new_tokens, int) or config.max_new_tokens < 1:
        return None
    eos = config.eos_token_id
    if eos is None:
        return config.max_new_tokens, None, None
    eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    if config.pad_token_id is None:  # transformers would pick (and warn about) a pad token: its loop decides
        return None
    return config.max_new_tokens, eos, int(config.pad_token_id)
