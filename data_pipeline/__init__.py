"""megabatch data pipeline: WebDataset shard writing, streaming reader, transforms,
tokenizer and the built-in demo dataset (to come)."""
