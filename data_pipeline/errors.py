"""The one exception type for problems a user can cause with their data or paths."""


class DataError(Exception):
    """A bad input path, a missing column, an empty source, an unwritable output folder,
    an output folder that holds something else...

    The message is one line that names the problem; the CLI prints it and exits with
    status 2 (docs/ARCHITECTURE.md: errors a user can cause never show a bare traceback).
    """
