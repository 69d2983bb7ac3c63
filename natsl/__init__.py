"""natsl: token-level hybrid attention (NAtS-L, arXiv 2602.03681) on flash-linear-attention and flash-attn."""

from natsl.layers.natsl_attention import NAtSLAttention, NAtSLLayerStats
from natsl.layers.routing import Routing
from natsl.models import GraphDecoder, NAtSLCache, NAtSLConfig, NAtSLForCausalLM, NAtSLModel
from natsl.ops import natsl_attention
from natsl.reference import natsl_attention_reference

__version__ = "0.1.0.dev0"

__all__ = ["GraphDecoder", "NAtSLAttention", "NAtSLCache", "NAtSLConfig", "NAtSLForCausalLM", "NAtSLLayerStats", "NAtSLModel",
           "Routing", "natsl_attention", "natsl_attention_reference", "__version__"]
