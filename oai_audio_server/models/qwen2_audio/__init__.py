"""Qwen2-Audio(-Instruct): Whisper-style encoder, projector and a Qwen2 decoder."""
