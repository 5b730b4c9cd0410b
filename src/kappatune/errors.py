"""One exception type for everything the user can fix (bad paths, options, data)."""


class KappaTuneError(ValueError):
    """A problem with the user's input. The CLI prints its message as one line, exit code 2."""
