"""Errors a user can cause. CLIs print them as one line and exit non-zero; anything else is a bug of ours."""


class UserError(Exception):
    """A problem with the user's input, config or environment, with a message that names the fix."""


class ConfigError(UserError):
    """An invalid configuration value or layout."""
