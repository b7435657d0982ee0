"""Qwen-Audio-Chat (the "QWen" decoder with a Whisper-style audio encoder)."""
