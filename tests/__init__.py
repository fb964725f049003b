"""megabatch tests. A package (like each subfolder) so that processes started by
tests/multiproc.py can import test modules by name."""
