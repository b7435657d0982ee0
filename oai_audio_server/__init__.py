"""OpenAI-compatible server for Qwen-Audio-Chat."""

__version__ = "0.1.0"
