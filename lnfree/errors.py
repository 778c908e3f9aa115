"""The one kind of error that is the user's, not lnfree's.

A UserError says what in the user's request cannot work (a config value, a model reference, data, a limit, a
run directory) and what to do instead. The entry points print its message alone; any other exception is a bug
and keeps its traceback.
"""


class UserError(ValueError):
    pass
