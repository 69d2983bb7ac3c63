"""natsl models (spec §4), registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from natsl.models.cache import NAtSLCache
from natsl.models.configuration_natsl import NAtSLConfig
from natsl.models.graphs import GraphDecoder
from natsl.models.modeling_natsl import NAtSLForCausalLM, NAtSLModel

AutoConfig.register(NAtSLConfig.model_type, NAtSLConfig, exist_ok=True)
AutoModel.register(NAtSLConfig, NAtSLModel, exist_ok=True)
AutoModelForCausalLM.register(NAtSLConfig, NAtSLForCausalLM, exist_ok=True)

__all__ = ["GraphDecoder", "NAtSLCache", "NAtSLConfig", "NAtSLForCausalLM", "NAtSLModel"]
