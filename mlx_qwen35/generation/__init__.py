from .api import generate, stream_generate
from .chat import Chat
from .generate import GenerationResponse, generate_tokens, make_sampling
from .speculative import SpeculativeResponse, speculative_tokens

__all__ = ["Chat", "GenerationResponse", "SpeculativeResponse", "generate", "generate_tokens", "make_sampling",
           "speculative_tokens", "stream_generate"]
