"""The data layer's one error type, in a module of its own so that the submodules (tokenizers,
prepare, loader) and the package's __init__ import it without a cycle."""


class DataError(ValueError):
    """A problem the user can fix (bad path, corrupt shard, too little data).

    The message is one line naming the bad file or value and how to fix it; the CLI
    prints it as `gigatrain: error: ...` and exits with status 2.
    """
