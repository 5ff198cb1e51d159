from .generate import GenerationResponse, generate_tokens

__all__ = ["GenerationResponse", "generate_tokens"]
