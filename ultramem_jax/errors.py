"""The one exception type for bad user input: train.py and the CLIs print it as one line and exit 2."""


class UsageError(Exception):
    """A config, data file, tokenizer, checkpoint or directory the user gave is unusable."""
