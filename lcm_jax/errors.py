"""The project's typed errors: an expected failure (bad input, a run that cannot go on) carries a
one-line message naming the file, field or value and what to do. Entry points print that line and
exit with status 2 (`report`); the Python API raises the exception itself. Imports nothing of
lcm_jax."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

DEBUG_ENV = "LCM_JAX_DEBUG"   # =1: entry points show the traceback instead of the one line
EXIT_BAD_INPUT = 2


class LcmError(Exception):
    """Base of the project's expected errors."""


class ConfigError(LcmError, ValueError):
    """A training config that cannot run: a field out of range, a name not known, a path missing,
    or a resume that would change the saved state's structure."""


class RunError(LcmError, ValueError):
    """A workdir that cannot be read back (no config.json, no such checkpoint)."""


class WeightsError(LcmError, ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file or key."""


class CliError(LcmError, ValueError):
    """A command-line argument that cannot be used."""


# What an entry point reports in one line: the project's errors and the standard ones that
# libraries raise for bad input (json.JSONDecodeError is a ValueError).
EXPECTED = (LcmError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def quiet_advice() -> None:
    """Entry points: no "PyTorch was not found" advice from transformers (lcm-jax uses only its
    tokenizers); its real warnings stay on. Call before transformers is imported."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def one_line(error: BaseException) -> str:
    """The first line of the error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def print_error(prog: str, error: BaseException, debug: bool = False) -> int:
    """Prints `prog: error: MESSAGE` on stderr (after the traceback when `debug` or $LCM_JAX_DEBUG
    is set); returns the exit status for bad input."""
    if debug_enabled(debug):
        traceback.print_exception(error)
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def report(prog: str, fn: Callable[[], Optional[int]], debug: bool = False) -> int:
    """Runs `fn()`; an expected error becomes one line on stderr and status 2 (`print_error`).
    Returns fn's status (None: 0)."""
    try:
        return fn() or 0
    except EXPECTED as e:
        return print_error(prog, e, debug)


def absl_flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for absl's app.run: a bad flag or ml_collections config override (a
    misspelt field with its "Did you mean", a wrong type, a missing config file) becomes one line
    naming the flag, and exit status 2."""
    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
            text = str(e)
            if len(text) > 1 and text[0] in "'\"" and text[-1] == text[0]:  # a KeyError's repr
                text = text[1:-1]
            text = text.replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
            named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                     and a.split("=")[0].rsplit(".", 1)[-1] in text]
            sys.exit(print_error(prog, ConfigError(f"{named[0]}: {text}" if named else text),
                                 "--debug" in argv))
    return parse
