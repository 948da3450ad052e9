"""ggflat engine: GGUF reading, tokenizers, chat templates, model configs and forward graphs."""
