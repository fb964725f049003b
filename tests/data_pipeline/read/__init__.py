"""Tests of megabatch.data_pipeline.read: the plan, the stream, the loader, transforms, views, the tokenizer."""
