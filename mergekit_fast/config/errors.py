"""Configuration errors: one exception whose message starts with the key path of the problem."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """The merge configuration is invalid; the message starts with the key path of the problem."""


class NotSupportedError(ConfigError):
    """The configuration is valid for mergekit but uses a feature mergekit_fast does not support yet."""


def show(value: Any) -> str:
    """A value for a message, cut to a readable length."""
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def describe(exc) -> str:
    """The first error of a pydantic ValidationError as `key.path[i]: message`."""
    err = exc.errors()[0]
    parts: list[str] = []
    for item in err["loc"]:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    loc = "".join(parts) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return (
            f"{loc}: unknown key (not part of mergekit 0.1.5's config schema; mergekit would silently ignore "
            "it, mergekit_fast refuses it so a misspelt key cannot change the merge)"
        )
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        sub = msg.split(": ", 1)
        if sub[0].startswith("[") or sub[0].startswith("."):
            # a message from parse_setting that names a spot inside the setting
            return f"{loc}{sub[0]}: {sub[1]}" if len(sub) == 2 else f"{loc}: {msg}"
        return f"{loc}: {msg}"
    if "input" in err and kind not in ("dict_type", "list_type", "model_type"):
        return f"{loc}: {msg} (got {show(err['input'])})"
    return f"{loc}: {msg}"
