"""Model code of this package: each supported family as a module that loads the
checkpoint's own weight files by name and runs on the engine's slot KV cache."""
