"""Command-line options generated from the settings they fill, as TRL's ``HfArgumentParser`` generates its flags.

A setting is declared once, as a dataclass field: its type, default, ``metadata["help"]`` and, where the flag is not
the field's name, ``metadata["flag"]``. A command names the objects it needs as parameters (``settings:
InstructSettings``, ``student: BackendConfig``) and ``@expand`` puts their options in the command's signature, where
typer reads them, then builds each object back from the parsed values before the command runs:

    @expand(settings=Settings(InstructSettings), instructor=INSTRUCTOR)
    def instruct(*, settings: InstructSettings, instructor: BackendConfig | None, ...) -> None: ...

A role's model (``STUDENT``, ``ASSISTANT``...) is three options, ``--[role-]backend``, ``--[role-]model`` and
``--[role-]base-url``, built into one ``BackendConfig`` here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeVar

import typer

from runtime.errors import ConfigError
from runtime.models.config import BACKEND_KINDS, BackendConfig, backend_config

F = TypeVar("F", bound=Callable[..., Any])


class Group(Protocol):
    """Options that build one object: what ``expand`` puts in a command's signature in place of one parameter."""

    def parameters(self) -> list[inspect.Parameter]: ...

    def build(self, values: dict[str, Any]) -> Any: ...


def expand(**groups: Group) -> Callable[[F], F]:
    """Replace each named parameter of the command with its group's options; the command gets the built object."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command, eval_str=True)
        generated = {name: group.parameters() for name, group in groups.items()}

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            for name, group in groups.items():
                values[name] = group.build({p.name: values.pop(p.name) for p in generated[name]})
            return command(**values)

        # In place, so that --help lists them where the command put the parameter; keyword-only, as typer passes them.
        options = [
            option
            for p in signature.parameters.values()
            for option in generated.get(p.name, [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)])
        ]
        run.__signature__ = signature.replace(parameters=options)  # type: ignore[attr-defined]
        run.__annotations__ = {}  # typer reads the evaluated signature above, not these strings
        return typing.cast(F, run)

    return decorate


@dataclass(frozen=True)
class Settings:
    """Every field of a settings dataclass as an option; the dataclass (its ``__post_init__`` checks the values,
    bounds included, naming the options) is built from them. A ``list[str]`` field is one comma-separated option."""

    cls: type

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        return [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=_default(f),
                annotation=Annotated[_cli_type(hints[f.name]), _option(f, bounds=False)],
            )
            for f in dataclasses.fields(self.cls)
        ]

    def build(self, values: dict[str, Any]) -> Any:
        hints = typing.get_type_hints(self.cls)
        return self.cls(**{name: _names(value) if _is_list(hints[name]) else value for name, value in values.items()})


def field_option(cls: type, name: str, *, help: str | None = None) -> Any:
    """One field's option, for ``Annotated[int, field_option(LoraSFTConfig, "max_steps")] = LoraSFTConfig.max_steps``
    where a command passes the value on rather than building the dataclass: its bound is then checked by the parser.
    ``help`` replaces the field's where the command gives the setting another meaning (another default)."""
    (f,) = (f for f in dataclasses.fields(cls) if f.name == name)
    return _option(f, bounds=True, help=help)


@dataclass(frozen=True)
class Role:
    """A role's model options, built into its ``BackendConfig``: the student's always (``--backend`` defaults to
    local), another role's only where one of its options is given (None: the command's default for the role)."""

    name: str  # "student", "assistant", ...: the options' prefix for any role but the student
    default: str  # what plays the role given no option, said in the help of its --model

    @property
    def prefix(self) -> str:
        return "" if self.name == "student" else f"{self.name}_"

    def parameters(self) -> list[inspect.Parameter]:
        fields = BackendConfig.model_fields
        owner = "" if self.name == "student" else f"the {self.name}'s "
        helps = {  # BackendConfig's own descriptions, with whose setting it is
            "backend": (owner and f"{owner}backend: ") + str(fields["kind"].description),
            "model": (owner and f"{owner}model: ") + f"{fields['model'].description} [default: {self.default}]",
            "base_url": owner + str(fields["base_url"].description),
        }
        kind = fields["kind"].default if self.name == "student" else None
        return [
            inspect.Parameter(
                self.prefix + name,
                inspect.Parameter.KEYWORD_ONLY,
                default=kind if name == "backend" else None,
                annotation=Annotated[str | None, typer.Option(help=text)],
            )
            for name, text in helps.items()
        ]

    def build(self, values: dict[str, Any]) -> BackendConfig | None:
        kind, model, base_url = (values[self.prefix + name] for name in ("backend", "model", "base_url"))
        if self.name != "student" and kind is None and model is None and base_url is None:
            return None
        if kind is not None and kind not in BACKEND_KINDS:
            flag = "--" + (self.prefix + "backend").replace("_", "-")
            raise ConfigError(f"unknown backend {kind!r}: choose {flag} {' | '.join(BACKEND_KINDS)}")
        return backend_config(kind=kind, model=model, base_url=base_url)


TEACHER_DEFAULT = "the embedded teacher where installed, else the student's model"  # common.teacher_default
STUDENT = Role("student", "the embedded default model")
ASSISTANT = Role("assistant", TEACHER_DEFAULT)
CORRECTOR = Role("corrector", TEACHER_DEFAULT)
INSTRUCTOR = Role("instructor", TEACHER_DEFAULT)


def _option(f: dataclasses.Field[Any], *, bounds: bool, help: str | None = None) -> Any:
    flag = f.metadata.get("flag")
    bound = f.metadata.get("bound") if bounds else None
    limits = {"min": bound.low, "max": bound.high} if bound is not None else {}
    assert bound is None or not (bound.open_low or bound.open_high), f"{f.name}: typer checks closed bounds only"
    return typer.Option(*([flag] if flag else []), help=help or f.metadata["help"], **limits)


def _default(f: dataclasses.Field[Any]) -> Any:
    """The field's default as the option takes it (a list joined by commas); none: the option is required."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        return inspect.Parameter.empty
    return ",".join(value) if isinstance(value, list) else value


def _is_list(hint: Any) -> bool:
    return any(typing.get_origin(t) is list for t in (hint, *typing.get_args(hint)))


def _cli_type(hint: Any) -> Any:
    """A ``list[str]`` field is typed in as one comma-separated string."""
    if not _is_list(hint):
        return hint
    return str | None if type(None) in typing.get_args(hint) else str


def _names(value: str | None) -> list[str] | None:
    """``"bbq, gsm8k"`` -> ``["bbq", "gsm8k"]``; None stays None (not given).

    >>> _names("bbq, gsm8k,"), _names(""), _names(None)
    (['bbq', 'gsm8k'], [], None)
    """
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]
