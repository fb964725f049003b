"""Tests of megabatch.data_pipeline.write: sources, the demo, the shard writer, the inspector."""
