"""User-facing errors: raised at the boundary with a message that names the file, key or value."""


class MosmosError(Exception):
    """A problem with the user's input (file, config, data). The CLI prints it without a traceback."""


class ConfigError(MosmosError, ValueError):
    """An invalid config key, type or value."""


class DataError(MosmosError, ValueError):
    """A dataset, table or volume that cannot be used as it is."""
