"""What a run prints: the console copied into <run>/train.log, and third-party lines that tell the user nothing
left out.

A run's train.log holds what the console showed: lnfree's lines, Lightning's and Python warnings. Progress bars
redraw their line with carriage returns; the log keeps only each line's last state, so it reads as a plain
file. Lightning's logger writes to the stream it found when it was imported, not to sys.stderr, so the log also
gets its own logging handler.

Left out everywhere (they carry nothing for lnfree's users, and some read as warnings about lnfree itself):
Lightning's advertising tips, a deprecation inside Lightning's own code, transformers' one-shard save bar.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

LOG_FILE = "train.log"
# loggers that do not propagate to the root logger (Lightning gives its own a handler when imported first)
_OWN_HANDLER_LOGGERS = ("lightning.pytorch", "lightning.fabric")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@rank_zero_only
def announce(message: str) -> None:
    """A line for the user during training, on its own line: tqdm clears the progress bar, prints, redraws it."""
    tqdm.write(message, file=sys.stdout)


class _DropTips(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines."""

    def filter(self, record):
        return not str(record.msg).startswith("💡 Tip")


def quiet_third_party() -> None:
    """Leave out third-party output that says nothing about the run (idempotent)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in logger.filters):
        logger.addFilter(_DropTips())
    # raised inside Lightning's _pytree helper on every fit with torch >= 2.9; nothing a user can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" for a one-file save


class _LineLog:
    """A text file that receives terminal output: a carriage return starts the line over, escape codes dropped."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed by RunConsole)
        self.line = ""

    def write(self, text: str) -> None:
        for part in re.split(r"(\r|\n)", _ANSI.sub("", text)):
            if part == "\n":
                self.file.write(self.line.rstrip() + "\n")
                self.line = ""
            elif part == "\r":
                self.line = ""
            else:
                self.line += part
        self.file.flush()

    def close(self) -> None:
        if self.line.strip():
            self.file.write(self.line.rstrip() + "\n")
        self.file.close()


class _Tee:
    """A console stream that also writes into the run's log."""

    def __init__(self, stream, log: _LineLog):
        self.stream, self.log = stream, log

    def write(self, text):
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ...: the console's
        return getattr(self.stream, name)


class _LogHandler(logging.Handler):
    """Logging records into the run's log, for loggers whose own handlers hold the original streams."""

    def __init__(self, log: _LineLog):
        super().__init__(logging.INFO)
        self.log = log
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record):
        self.log.write("\r" + self.format(record) + "\n")  # on a line of its own, not after a bar's state


@contextlib.contextmanager
def run_console(out_dir: str | Path):
    """Copy everything the run prints into <out_dir>/train.log (appended: a resumed run continues the log)."""
    log = _LineLog(Path(out_dir) / LOG_FILE)
    handler = _LogHandler(log)
    loggers = [logging.getLogger(n) for n in _OWN_HANDLER_LOGGERS if not logging.getLogger(n).propagate]
    loggers.append(logging.getLogger())
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(stdout, log), _Tee(stderr, log)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield Path(out_dir) / LOG_FILE
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        sys.stdout, sys.stderr = stdout, stderr
        log.close()

