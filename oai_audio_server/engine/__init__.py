"""The model engine: one model, one worker thread, many requests batched together."""
