"""Chat completions: OpenAI messages in, Qwen prompts to the engine, OpenAI objects out."""
