from .api import generate, stream_generate
from .chat import Chat
from .generate import GenerationResponse, generate_tokens, make_sampling

__all__ = ["Chat", "GenerationResponse", "generate", "generate_tokens", "make_sampling", "stream_generate"]
