"""The one error type for bad user input: a data set, a file, a value. Its message names the thing and the problem;
train.py and eval.py print it (no traceback) and exit with status 1."""


class InputError(Exception):
    """Bad user input; str(error) is the whole message a user sees."""
