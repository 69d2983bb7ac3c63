"""natsl models (HF-compatible configs and causal LMs)."""
