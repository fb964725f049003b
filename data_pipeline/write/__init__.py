"""The write side: where samples come from (``sources``, ``demo``), the resumable shard
writer (``writer``) and the shard checker (``inspect_shards``). Imports nothing of
``megabatch.data_pipeline.read``."""
