"""One module per method (a ``tasks.Task``): CLIP, SimCLR, MoCo v3, BYOL and the pretext
tasks; ``base`` and ``siamese`` hold what several of them share, ``momentum`` the
momentum encoder. trainer/README.md: adding a method."""
