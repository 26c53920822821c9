"""Model families. Each maps a `ModelConfig` to a torch module with HF parameter names."""

from tandem.engine.models.llama import LlamaForCausalLM

MODEL_FAMILIES = {"llama": LlamaForCausalLM}

__all__ = ["MODEL_FAMILIES", "LlamaForCausalLM"]
