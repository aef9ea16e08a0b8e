"""The one exception type for mistakes a user can fix (bad config, bad file, bad value).

Its message is a single line that names the file, key or value and says what is expected. Entry points print it
and exit with code 2; everything else (a bug) keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
