"""The one error type evaluators raise for bad input; the entry points print it without a traceback."""


class EvalError(ValueError):
    """Bad evaluation input (model, shards, options), raised before any expensive work where possible."""
