"""Reading and writing the JSON records that results are made from, so that a damaged record is refused, never
half-used, and a committed one is never overwritten by a command that was not told to write there.

- read_json / read_jsonl: a half-written or malformed file, a NaN where a number is needed, a missing key are a
  RecordError naming the file and the line;
- append_jsonl: adds records to a .jsonl without ever dropping one already there (deduplicated by a key, a
  conflicting duplicate refused), atomically (the file is whole before and after, never half-written) and under a
  lock (two processes appending at once each keep the other's records);
- write_text_atomic: a file appears whole or not at all;
- output_dir: where an analysis or evaluation command writes: the dir it was told, else a new one under outputs/;
  committed results (experiments/) only when named explicitly.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from pathlib import Path

from .errors import UserError
from .paths import PACKAGE_DIR

# the committed results of a source checkout (README's and docs' tables are made from them)
EXPERIMENTS_DIR = PACKAGE_DIR.parent / "experiments"


class RecordError(UserError):
    pass


def _decode_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> RecordError:
    where = f"{path}:{line if line is not None else e.lineno}"
    return RecordError(f"{where}: not valid JSON ({e.msg}); a half-written or hand-edited record? Restore it "
                       "(git checkout, or rerun the command that wrote it)")


def check_fields(record: dict, where: str, required=(), finite=()) -> dict:
    """`record` with every key of `required` present and every key of `finite` a finite number, else a
    RecordError naming `where` (file:line)."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    missing = [k for k in required if k not in record]
    if missing:
        raise RecordError(f"{where}: record without {', '.join(map(repr, missing))}")
    for k in finite:
        v = record.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RecordError(f"{where}: {k}={v!r} is not a finite number")
    return record


def read_json(path: str | Path, required=(), finite=()) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise _decode_error(path, e) from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return check_fields(record, str(path), required, finite)


def read_jsonl(path: str | Path, required=(), finite=()) -> list[dict]:
    """One record per non-empty line, each checked (check_fields); a bad line is named by its number."""
    path = Path(path)
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _decode_error(path, e, i) from None
        out.append(check_fields(record, f"{path}:{i}", required, finite))
    return out


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same dir, renamed over it: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def append_jsonl(path: str | Path, records: list[dict], key, required=(), finite=()) -> int:
    """Add `records` to the .jsonl at `path` (created if missing): every record already there is kept, a record
    whose key(record) is already there with the same values (in the fields both hold) is not added twice, one
    with another value is a RecordError (two results for one run); the file is rewritten atomically. Returns how
    many were added."""
    path = Path(path)
    with _locked(path):  # two writers (two sweep processes) each keep the other's records
        return _append_jsonl(path, records, key, required, finite)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (fcntl) on the directory of `path` for the read-modify-write of the file: no
    lock file is left beside the records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _append_jsonl(path: Path, records: list[dict], key, required, finite) -> int:
    old = read_jsonl(path, required, finite) if path.exists() else []
    seen = {key(r): r for r in old}
    new = []
    for r in records:
        k = key(r)
        if k in seen:
            diff = sorted(f for f in set(seen[k]) & set(r) if not _same(seen[k][f], r[f]))
            if diff:
                raise RecordError(f"{path} already holds a record for {k} that differs in {', '.join(diff)}: "
                                  "two results for one run; nothing was written")
            continue
        seen[k] = r
        new.append(r)
    if new or not path.exists():
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in [*old, *new]))
    return len(new)


def under_experiments(path: str | Path) -> bool:
    """Whether `path` is inside the checkout's committed results (experiments/)."""
    try:
        Path(path).expanduser().resolve().relative_to(EXPERIMENTS_DIR.resolve())
        return True
    except ValueError:
        return False


def output_dir(named: str | Path | None, command: str) -> Path:
    """Where an analysis command writes: `named` (the user said so, experiments/ included), else a new dir
    outputs/<command>/<time> that no earlier command wrote into."""
    if named:
        out = Path(named).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        return out
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for i in range(1000):
        out = Path("outputs") / command / (stamp if i == 0 else f"{stamp}_{i}")
        try:
            out.mkdir(parents=True)
        except FileExistsError:
            continue
        print(f"[lnfree] writing to {out} (no output dir named; --out DIR writes elsewhere)")
        return out
    raise RecordError(f"no free output dir under outputs/{command}/{stamp}_*")


def job_output_dir(named: str | None, command: str, key: str = "output_dir") -> Path:
    """Where a Hydra command (eval, downstream) writes: `named`, else the job's own new dir (its hydra.run.dir,
    outputs/<command>/<time>). A dir inside experiments/ only when `key=...` was given on the command line (the
    Makefile's targets do): a value from a config file never writes over committed results."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # called from Python: the caller named it (made when written), or a new dir
        return Path(named).expanduser() if named else output_dir(None, command)
    hc = HydraConfig.get()
    if not named:
        return Path(hc.runtime.output_dir)
    given = any(o.split("=", 1)[0].lstrip("+~") == key for o in hc.overrides.task)
    if under_experiments(named) and not given:
        raise RecordError(f"{key}={named} is inside experiments/ (committed results) but was not named on the "
                          f"command line: pass {key}={named} to rewrite them, or leave {key} unset for a new dir")
    return Path(named).expanduser()
