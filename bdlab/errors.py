"""The one exception type for bad user input, so the entry points can turn it into one line and exit 2."""

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


class ConfigError(ValueError):
    """A configuration value that cannot work, found before anything is trained or written.

    ``field`` is the dotted config key (``attack.poison_rate``); the message says what is
    allowed, so the user can fix the command line without reading code.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_range(field: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` lies in the stated interval."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ConfigError(field, f"got {value}, must be in {left}{low}, {high}{right}")


def check_at_least(field: str, value: float, minimum: float) -> None:
    """Raise :class:`ConfigError` unless ``value >= minimum`` (NaN is refused too)."""
    if not value >= minimum:
        raise ConfigError(field, f"got {value}, must be >= {minimum}")


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets a constructor's ConfigError through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
