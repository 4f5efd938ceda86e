"""Models in and out: the Hugging Face layout (config.json, safetensors, tokenizer.json) to and from gigatrain runs."""

# A Hugging Face model folder's files, as export writes them and import reads them.
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"  # all the weights in one file, below the shard size
INDEX_FILE = "model.safetensors.index.json"  # else: which shard file holds each weight
