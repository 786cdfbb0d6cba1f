"""What the command-line scripts share: every config key as a documented flag, and user errors
as one line.

The flags are generated from the dataclasses of :mod:`dynvit.config`: each field becomes
``--section.key`` with its type (or its choices), its default and the comment written beside
it in the source, so a key added there is documented in ``train.py --help`` without more work.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager

from .config import _CHOICES, Config, ConfigError
from .data import DataError
from .weights import WeightMismatchError

__all__ = ["ArgumentParser", "field_comments", "add_config_arguments", "config_overrides", "HelpFormatter", "USER_ERRORS", "one_line",
           "user_errors"]

# Errors a user causes and fixes (a key, a path, a file); anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, WeightMismatchError, FileNotFoundError, FileExistsError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, ``error: <message> (see --help)``, exit code 2
    (argparse prints the whole usage first, which buries the message)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, every option's default, and no line broken inside a name such
    as ``local-dir:DIR``."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


# ---- flags from the dataclasses ---------------------------------------------------------------
def field_comments(cls: type) -> dict[str, str]:
    """The comment written after each field of the dataclass ``cls`` in its source file."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    found = {}
    for number, line in enumerate(source.splitlines(), start=1):
        name = line.strip().split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and name in names and number in comments:
            found[name] = comments[number]
    return found


def _shown(value) -> str:
    """A default as the user would type it (YAML): bare strings, JSON for the rest."""
    if isinstance(value, str) and value:
        return value
    return json.dumps(value)


def _metavar(tp) -> str:
    """``FLOAT|LIST`` for ``float | list[float] | None``."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    options = [t for t in typing.get_args(tp) if t is not type(None)] if union else [tp]
    names = [getattr(typing.get_origin(t) or t, "__name__", "value") for t in options]
    return "|".join(n.upper() for n in names)


def add_config_arguments(parser: argparse.ArgumentParser, cfg: Config | None = None) -> None:
    """One argument group per config section, one ``--section.key`` per field, documented."""
    cfg = cfg or Config()
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(sub))
        comments = field_comments(type(sub))
        group = parser.add_argument_group(f"{section.name} (YAML section '{section.name}:')")
        for f in dataclasses.fields(sub):
            key = f"{section.name}.{f.name}"
            choices = _CHOICES.get(key)
            metavar = "{" + ",".join(choices) + "}" if choices else _metavar(hints[f.name])
            text = f"{comments.get(f.name, '')} (default: {_shown(getattr(sub, f.name))})"
            group.add_argument(f"--{key}", dest=key, metavar=metavar, default=argparse.SUPPRESS,
                               help=text.replace("%", "%%"))


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--section.key=value`` flags of ``args`` (as given, in order), for :func:`dynvit.config.load_config`."""
    return [f"--{key}={value}" for key, value in vars(args).items() if "." in key]


# ---- errors ---------------------------------------------------------------------------------
def one_line(error: BaseException) -> str:
    """The message of a user error, on one line. An error raised in a data-loader worker comes
    back wrapped in the worker's traceback ("Caught DataError in DataLoader worker process
    0 ... Original Traceback ..."); only its own message is kept."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(error).__name__}: "
        text = last.split(prefix, 1)[1] if prefix in last else last
    return " ".join(text.split())


@contextmanager
def user_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turn a user error raised in the block into ``error: <message>`` on stderr and exit code 2."""
    try:
        yield
    except USER_ERRORS as e:
        sys.stderr.flush()
        parser.exit(2, f"error: {one_line(e)}\n")
