"""One exception type for mistakes a user can fix; the CLI prints its message as one line."""


class VitDeployError(Exception):
    """A user-facing error: the message names the problem and what to do."""


class CheckpointError(VitDeployError, ValueError):
    """A checkpoint that cannot be found, read or matched to the model."""


class ConfigError(VitDeployError, ValueError):
    """A model configuration, preset or argument that cannot work (still a ValueError, as it was)."""
