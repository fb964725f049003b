"""Tests of megabatch.data_pipeline, laid out like it: read/ and write/ for the two sides,
the shared and top modules (manifest, shard specs, caps, CLI, benchmark, the import
rules) here. fake_shards and helpers make the shard sets and images they read."""
