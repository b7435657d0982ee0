"""OpenAI's Realtime API without HTTP: wire types, input audio, server VAD, sessions."""
