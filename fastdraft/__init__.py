"""fastdraft: train a vocabulary-compatible draft for any LLM and serve the pair with speculative decoding."""

__version__ = "0.1.0"
