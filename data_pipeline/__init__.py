"""megabatch data pipeline: images and captions -> WebDataset tar shards -> training batches.

- ``write``: sources of samples, the shard writer, the demo data set, the shard checker.
- ``read``: the streaming reader (plan, stream, loader), image transforms, SimCLR views,
  the caption tokenizer.
- shared by both (and importing neither): ``errors``, ``limits``, ``shard_format``,
  ``manifest``, ``shard_specs``, ``tar_members``, ``image_decode``.
- on top: ``cli`` (``megabatch data``) and ``benchmark``.

See README.md in this folder.
"""
