"""megabatch data pipeline. Writing side: sources of images and captions (`sources`), the
built-in demo dataset (`demo`), the WebDataset shard writer (`writer`), the shard checker
(`inspect_shards`) and `megabatch data` (`cli`). The reading side (streaming reader,
transforms, tokenizer) sits beside them."""
