"""One exception type for bad input, so the CLI can print it plainly and exit non-zero."""


class SynthPertError(Exception):
    """A user-facing error: the message names the file, row or value that is wrong."""
