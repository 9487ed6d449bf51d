"""How an engine option is declared: `option(...)` on a field of the config tree (engine/config.py).

Each user-settable option is declared once, on the EngineConfig field it fills: its keyword (LLM(...) and
EngineConfig.create), the keyword's default, a help line, its choices, and the server's command-line flags.
LLM and EngineConfig.create accept exactly these keywords; server/cli.py builds its flags from them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EngineOption:
    name: str  # the LLM(...) / EngineConfig.create keyword
    default: Any  # the keyword's default (None where the engine decides from the device or the model: see help)
    help: str
    flags: tuple[str, ...] = ()  # server flags: SGLang's spelling first (it names the parsed field), aliases after
    type: Callable[[str], Any] | None = None  # bool: an on/off switch; else how a flag's value is parsed
    choices: tuple[Any, ...] | None = None
    off_flags: tuple[str, ...] = ()  # flags that set the option to False (SGLang's --disable-* spellings)

    @property
    def dest(self) -> str:
        """The parsed field of the server's command line (argparse dest): from the first flag, else the name."""
        flag = self.flags[0] if self.flags else None
        return flag.lstrip("-").replace("-", "_") if flag else self.name


REQUIRED = object()  # field_default for a field without a dataclass default (its value is always resolved)
_SAME = object()


def option(
    name: str,
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    type: Callable[[str], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    off_flags: tuple[str, ...] = (),
    field_default: Any = _SAME,
) -> Any:
    """A dataclass field declaring an engine option. The field's own default is the keyword's default unless
    `field_default` says otherwise (the resolved value for a keyword whose default is "decide for me")."""
    meta = {"option": EngineOption(name, default, help, flags, type, choices, off_flags)}
    if field_default is REQUIRED:
        return field(metadata=meta)
    return field(default=default if field_default is _SAME else field_default, metadata=meta)


def option_of(f: Any) -> EngineOption | None:
    return f.metadata.get("option")


__all__ = ["REQUIRED", "EngineOption", "option", "option_of"]
