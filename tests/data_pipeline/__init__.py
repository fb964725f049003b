"""Tests of data_pipeline: sources, the demo, the shard writer, the inspector, the CLI."""
