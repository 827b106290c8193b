"""A bench run's log: one JSON line per finished run, so a long sweep can be read, resumed and re-rendered.

Line kinds (each a JSON object with a ``kind``):
  ``setup``      first line: what is measured (settings, prompts, configurations)
  ``run``        one (prompt, method, budget, temperature) generation and its stats
  ``bandwidth``  the stream bandwidth measured before/after an invocation's runs
  ``pipeline``   what an invocation resolved the settings to (model names, placement)
  ``reads``      bytes the streamer read during one run and the seconds it spent reading them

Only prompts on which *every* configuration finished count: the rows then hold
the same prompts, so their ratios compare like with like even when a sweep was
cut short.  Resuming with the same setup skips complete prompts and re-runs the
rest from their first configuration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from specchat.bench.sweep import Row, RunRecord
from specchat.common.errors import InputError
from specchat.engine.events import GenerationStats

Key = tuple[str, int | None, float]  # (method, budget: None for auto, temperature)
LOGGED_AUTO = -1  # how a log line spells the auto budget


@dataclass
class BenchLog:
    setup: dict
    configurations: list[Key]
    runs: dict[int, dict[Key, GenerationStats]] = field(default_factory=dict)
    bandwidths: list[float] = field(default_factory=list)
    resolved: dict | None = None  # the last invocation's resolved setup
    reads: list[tuple[int, float]] = field(default_factory=list)  # (bytes, seconds) per run

    def complete_prompts(self) -> list[int]:
        wanted = set(self.configurations)
        return sorted(p for p, done in self.runs.items() if wanted <= set(done))

    def rows(self) -> list[Row]:
        """One Row per configuration over the prompts every configuration finished."""
        rows = {key: Row(*key) for key in self.configurations}
        for prompt in self.complete_prompts():
            for key, row in rows.items():
                row.runs.append(self.runs[prompt][key])
        return list(rows.values())

    @property
    def stream_bytes_per_s(self) -> float | None:
        return stream_rate(self.reads, self.bandwidths)[0]

    @property
    def stream_source(self) -> str | None:
        return stream_rate(self.reads, self.bandwidths)[1]


def stream_rate(reads: list[tuple[int, float]], alone: list[float]) -> tuple[float | None, str | None]:
    """The stream's bandwidth for the physical limit, and how it was measured.

    Preferred: bytes / seconds the reader spent reading *during* the runs (the disk
    as it was while they ran); else the layer files read alone before/after them.
    """
    total_bytes, total_s = sum(b for b, _ in reads), sum(s for _, s in reads)
    if total_bytes > 0 and total_s > 0:
        return total_bytes / total_s, "read during the runs"
    if alone:
        return sum(alone) / len(alone), "layer files read alone, before and after the runs"
    return None, None


def _key(record: dict | list) -> Key:
    method, budget, temperature = (
        (record["method"], record["budget"], record["temperature"]) if isinstance(record, dict) else record
    )
    return (str(method), None if int(budget) == LOGGED_AUTO else int(budget), float(temperature))


def _logged(key: Key) -> list:
    method, budget, temperature = key
    return [method, LOGGED_AUTO if budget is None else budget, temperature]


def read_log(path: Path) -> BenchLog:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read bench log {path}: {exc.strerror}", "check the path") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"bench log {path} is not UTF-8 text", "give a file written by `specchat bench --log`") from exc
    log = None
    stat_names = {f.name for f in fields(GenerationStats)}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["kind"]
            if kind == "setup" and log is None:
                log = BenchLog(record["setup"], [_key(c) for c in record["configurations"]])
            elif kind == "run" and log is not None:
                stats = GenerationStats(**{k: v for k, v in record["stats"].items() if k in stat_names})
                log.runs.setdefault(int(record["prompt"]), {})[_key(record)] = stats
            elif kind == "bandwidth" and log is not None:
                log.bandwidths.append(float(record["bytes_per_s"]))
            elif kind == "reads" and log is not None:
                log.reads.append((int(record["bytes"]), float(record["seconds"])))
            elif kind == "pipeline" and log is not None:
                log.resolved = dict(record["setup"])
            else:
                raise ValueError(kind)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if number == len(lines):
                break  # a run cut off mid-write: the last line may be partial
            raise InputError(
                f"{path}, line {number}: not a specchat bench log record", "give a file written by `specchat bench --log`"
            ) from exc
    if log is None:
        raise InputError(f"{path} holds no bench setup line", "give a file written by `specchat bench --log`")
    return log


def _drop_partial_last_line(path: Path) -> None:
    """A run killed mid-write leaves a line without its newline: cut it so appends start clean."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as file:
            file.truncate(data.rfind(b"\n") + 1)


class LogWriter:
    """Appends records to a bench log, one flushed line each (a killed run loses at most one line)."""

    def __init__(self, path: Path, setup: dict, configurations: list[Key]) -> None:
        self.path = path
        self.existing = self._open_existing(setup, configurations)
        try:
            self._file = path.open("a")
        except OSError as exc:
            raise InputError(f"cannot write bench log {path}: {exc.strerror}", "choose a writable --log path") from exc
        if self.existing is None:
            self._write({"kind": "setup", "setup": setup, "configurations": [_logged(c) for c in configurations]})

    def _open_existing(self, setup: dict, configurations: list[Key]) -> BenchLog | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        log = read_log(self.path)
        if log.setup != setup or log.configurations != configurations:
            raise InputError(
                f"bench log {self.path} was written by a different benchmark ({_first_difference(log, setup, configurations)})",
                "give a new --log path, or the same options as the logged run to resume it",
            )
        _drop_partial_last_line(self.path)
        return log

    def done_prompts(self) -> set[int]:
        return set(self.existing.complete_prompts()) if self.existing else set()

    def run(self, record: RunRecord) -> None:
        self._write({
            "kind": "run", "prompt": record.prompt, "method": record.method,
            "budget": LOGGED_AUTO if record.budget is None else record.budget,
            "temperature": record.temperature, "stats": record.stats.to_dict(),
        })

    def pipeline(self, resolved: dict) -> None:
        self._write({"kind": "pipeline", "setup": resolved})

    def reads(self, read_bytes: int, seconds: float) -> None:
        self._write({"kind": "reads", "bytes": read_bytes, "seconds": seconds})

    def bandwidth(self, bytes_per_s: float) -> None:
        self._write({"kind": "bandwidth", "bytes_per_s": bytes_per_s})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _first_difference(log: BenchLog, setup: dict, configurations: list[Key]) -> str:
    """What a resumed log disagrees on, as the user would fix it: the first differing setting."""
    for key in sorted(set(log.setup) | set(setup)):
        if log.setup.get(key) != setup.get(key):
            return f"{key}: logged {log.setup.get(key)!r}, now {setup.get(key)!r}"
    return f"configurations: logged {len(log.configurations)}, now {len(configurations)} (methods, budgets or temperatures)"
