"""The package's one exception base.

Every failure a user can fix (bad input, a missing file, a refused option, a check that did not pass) raises a
subclass of `LlamaEncoderError` with a message that names the problem and the fix. The CLI prints those in one line;
anything else is a bug and keeps its traceback.
"""


class LlamaEncoderError(Exception):
    """An expected failure with a message meant for the user (what is wrong and how to fix it)."""
