"""The error `sis` reports as one line (file and cause) instead of a traceback."""


class SisError(Exception):
    """Bad input: a config, a job argument, settings.py, an output name. The message names file and cause."""
