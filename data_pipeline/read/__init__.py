"""The read side: shard specifications resolved (``shard_specs``) -> who reads what
(``shard_plan``) -> raw samples (``shard_stream``) -> batches (``loader``), with the
image work (``transforms``, ``views``), the caption tokenizer (``tokenizer``), the batch
buffers (``batch_buffers``) and the lazily parsed metadata (``metadata``). Imports
nothing of ``megabatch.data_pipeline.write``."""
