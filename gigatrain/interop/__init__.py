"""Models in and out: the Hugging Face layout (config.json, safetensors, tokenizer.json) to and from gigatrain runs."""
