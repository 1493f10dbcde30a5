"""The one exception type for bad user input, so the entry points can turn it into one line and exit 2, and
the one check of every config field against its constructor's signature and type hints before any work."""

import inspect
import types
import typing
from typing import Any, Literal, Union

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


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


def fits(hint: Any, value: Any) -> bool | None:
    """Whether ``value`` fits the type hint; None when the hint is beyond this check (a list's items, classes,
    ``Any``: the constructor checks those). Bools are not numbers here, and a float is never an int."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        verdicts = [fits(arg, value) for arg in typing.get_args(hint)]
        return True if True in verdicts else None if None in verdicts else False
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(hint))
    if origin in (list, tuple) or hint in (list, tuple):
        return None if isinstance(value, ListConfig) else False
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {type(None): value is None, bool: isinstance(value, bool), str: isinstance(value, str),
            int: numeric and isinstance(value, int), float: numeric}.get(hint)


def describe(hint: Any) -> str:
    """A type hint in the words of the config file."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(option) for option in typing.get_args(hint))
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, "a list")


def signature(target: Any) -> tuple[dict[str, Any], bool]:
    """The keyword arguments ``target`` takes with their type hints (None where a hint cannot be resolved),
    following ``**kwargs`` up a class's MRO; and whether it takes any other keyword too."""
    functions = [c.__dict__["__init__"] for c in target.__mro__[:-1] if "__init__" in c.__dict__] \
        if inspect.isclass(target) else [target]
    taken: dict[str, Any] = {}
    for function in functions:
        namespace = getattr(inspect.unwrap(function), "__globals__", {})
        open_ended = False
        for name, parameter in inspect.signature(function).parameters.items():
            open_ended |= parameter.kind is inspect.Parameter.VAR_KEYWORD
            if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            try:  # one hint at a time: an unresolvable one (a TYPE_CHECKING import) leaves the others checked
                hint = parameter.annotation
                taken.setdefault(name, eval(hint, namespace) if isinstance(hint, str) else hint)
            except (NameError, AttributeError, TypeError, SyntaxError):
                taken.setdefault(name, None)
        if not open_ended:
            return taken, False
    return taken, True


def check_fields(node: Any, path: str, target: Any = None, given: Any = ()) -> None:
    """Refuse, as ``ConfigError(<path>.<key>)``, a field the ``_target_`` (or ``target``) does not take or whose
    value does not fit its constructor's type hint, here and in every nested node; ``given`` keys come from
    the caller instead. Ranges and relations between fields stay in the constructors."""
    if not isinstance(node, DictConfig):
        return
    prefix = f"{path}." if path else ""
    try:
        target = target or ("_target_" in node and get_object(str(node._target_)))
    except (ImportError, ValueError):  # an unimportable _target_: hydra's error says why
        target = None
    taken, open_ended = signature(target) if target else ({}, True)
    for key in map(str, node):
        # an interpolation (attack.seed: ${seed}) is checked where its value is written, under that name
        if key.startswith("_") or key in given or OmegaConf.is_interpolation(node, key):
            continue
        if key not in taken and not open_ended:
            raise ConfigError(prefix + key, f"{target.__name__} has no such field; it takes {', '.join(taken)}")
        try:
            value = node[key]
        except OmegaConfBaseException:  # a missing or unresolvable value: OmegaConf says which where it is used
            continue
        if fits(taken.get(key), value) is False:
            raise ConfigError(prefix + key, f"got {value!r}, must be {describe(taken[key])}")
        if node.get("_recursive_", True):  # a node that builds its children itself checks them when it does
            check_fields(value, prefix + key)


#: the run config's own keys (conf/config.yaml and its groups), and those of the nodes without a ``_target_``
RUN_KEYS = ("dataset", "model", "attack", "defense", "trainer", "logger", "analysis", "seed", "nsr", "cache_dir",
            "data_dir", "optimizer", "scheduler")
MODEL_KEYS = ("name", "net", "lr", "batch_size", "weights", "mean", "std")
NSR_KEYS = ("layer", "top_k")


def check_keys(node: Any, path: str, known: tuple[str, ...], hint: str = "") -> None:
    """Refuse, as ``ConfigError(<path>.<key>)``, a key of a node without a ``_target_`` that nothing reads (a
    typo, or a ``+`` that adds what bdlab does not take), so it is not silently ignored."""
    for key in map(str, node or {}):
        if key not in known:
            where = f"{path}." if path else ""
            raise ConfigError(where + key, f"no such field; {path or 'the run config'} takes {', '.join(known)}{hint}")


def check_config(cfg: DictConfig) -> None:
    """:func:`check_fields` on a whole run config before any work: the known keys of the root, ``model`` and
    ``nsr`` nodes, every ``_target_`` node, the ``trainer`` group against Lightning's Trainer, the loggers
    less the nulls :func:`bdlab.loggers.build_loggers` fills."""
    check_keys(cfg, "", RUN_KEYS)
    check_keys(cfg.get("model"), "model", MODEL_KEYS, " (weights to load: model.weights=PATH)")
    check_keys(cfg.get("nsr"), "nsr", NSR_KEYS)
    check_fields(cfg, "", given=("trainer", "logger"))
    check_fields(cfg.trainer, "trainer", get_object("pytorch_lightning.Trainer"))
    for name, node in (cfg.get("logger") or {}).items():
        check_fields(node, f"logger.{name}", given=[key for key, value in node.items() if value is None])


def build(node: Any, path: str | None = None, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` after :func:`check_fields`, letting a constructor's ConfigError through
    unwrapped. ``path`` is where the node sits in the run config when it is not the node's own key (a copy, a
    nested node built by its parent): a ConfigError raised inside is re-prefixed with it
    (``defense.epochs`` of the inspector becomes ``defense.inspector.epochs``)."""
    if isinstance(node, DictConfig):
        check_fields(node, path or node._get_full_key(None), given=kwargs)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is None:
            raise
        if path and not (cause.field == path or cause.field.startswith(path + ".")):
            cause = ConfigError(path + cause.field[len(cause.field.split(".")[0]):], cause.message)
        raise cause from None
