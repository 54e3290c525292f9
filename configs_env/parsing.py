"""Parsers for environment values; each raises ConfigError with one line: name, value, what is allowed."""

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from configs_env.errors import ConfigError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")     # matched whole: a `$` anchor passes "name\n"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

Parser = Callable[[str, str], object]


@dataclass(frozen=True)
class Integer:
    """An integer within bounds; a refusal suggests `example`, the setting's default unless one is given."""

    minimum: int
    maximum: int | None = None
    example: int | None = None

    def __call__(self, name: str, raw: str) -> int:
        text = raw.strip()
        ok = text.lstrip("-").isdigit() and int(text) >= self.minimum and \
            (self.maximum is None or int(text) <= self.maximum)
        if not ok:
            upper = f" and <= {self.maximum}" if self.maximum is not None else ""
            raise ConfigError(f"{name}={raw!r}: expected an integer >= {self.minimum}{upper} (e.g. "
                              f"{name}={self.example})")
        return int(text)


@dataclass(frozen=True)
class Number:
    """A finite number within bounds; a refusal suggests `example`, the setting's default unless one is given."""

    minimum: float
    example: str | float | None = None
    exclusive: bool = False
    maximum: float | None = None

    def __call__(self, name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        too_big = self.maximum is not None and value > self.maximum
        if not (value > self.minimum if self.exclusive else value >= self.minimum) or value != value \
                or value == float("inf") or too_big:
            bound = ">" if self.exclusive else ">="
            upper = f" and <= {self.maximum:g}" if self.maximum is not None else ""
            shown = f"{self.example:g}" if isinstance(self.example, float) else self.example
            raise ConfigError(f"{name}={raw!r}: expected a number {bound} {self.minimum:g}{upper} (e.g. "
                              f"{name}={shown})")
        return value


def suggesting(parse: Parser, default: object) -> Parser:
    """`parse`, its refusals suggesting the setting's default where it names no example of its own: a value a
    user may set and that works (a bound such as MAX_NEW_TOKENS=1 is accepted but useless)."""
    if isinstance(parse, (Integer, Number)) and parse.example is None:
        if default is None:
            raise ValueError("a bounded setting without a default needs an example for its errors")
        return replace(parse, example=default)
    return parse


def boolean(name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r}: expected true or false (e.g. {name}=true)")


def choice(options: Sequence[str]) -> Parser:
    def parse(name: str, raw: str) -> str:
        text = raw.strip().lower()
        if text not in options:
            raise ConfigError(f"{name}={raw!r}: expected one of {', '.join(options)}")
        return text
    return parse


def safe_name(name: str, raw: str) -> str:
    """Names that become folder names: no separators, no dots first, bounded length."""
    text = raw.strip()
    if not SAFE_NAME.fullmatch(text):
        raise ConfigError(f"{name}={raw!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit (e.g. {name}=sapo-run1)")
    return text


def text(name: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(f"{name} is set but empty: unset it to use the default, or give a value")
    return value


def path(name: str, raw: str) -> Path:
    return Path(text(name, raw)).expanduser()


URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def local_folder(name: str, raw: str) -> Path:
    """GDRIVE_PATH: a folder on this machine. A URL (s3://, gs://) is refused, not made into a local folder named
    `s3:`: the records go to a bucket through SWARM_URL, and checkpoints, the base model and logs stay here."""
    value = text(name, raw)
    if URL_SCHEME.match(value):
        store = f"SWARM_URL={value.rstrip('/')}" if value.startswith(("s3://", "gs://")) else \
            "SWARM_URL=s3://bucket/prefix or gs://bucket/prefix"
        raise ConfigError(f"{name}={raw!r}: a URL, not a folder of this machine; an object store goes in {store}, "
                          f"and {name} stays a local folder (checkpoints, the base model and logs)")
    return Path(value).expanduser()


STORE_URL = re.compile(r"(?P<scheme>s3|gs)://(?P<bucket>[a-z0-9][a-z0-9._-]{1,61}[a-z0-9])"
                       r"(?P<prefix>(/[A-Za-z0-9._-]+)*)/?")


def store_url(name: str, raw: str) -> str | None:
    """`s3://bucket/prefix` or `gs://bucket/prefix`; no credentials, query or odd characters in it."""
    text_ = raw.strip()
    if not text_:
        return None
    if not STORE_URL.fullmatch(text_) or "/../" in f"{text_}/" or "/./" in f"{text_}/":
        raise ConfigError(f"{name}={raw!r}: expected s3://bucket/prefix or gs://bucket/prefix (a bucket of 3-63 "
                          "lowercase letters, digits, '.', '-'; folders of letters, digits, '.', '_', '-'; no "
                          f"credentials in it: they come from the environment) (e.g. {name}=s3://my-bucket/swarm)")
    return text_.rstrip("/")


def optional_text(name: str, raw: str) -> str | None:
    return raw.strip() or None


def device(name: str, raw: str) -> str:
    text_ = raw.strip().lower()
    if text_ in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,2}", text_):
        return text_
    raise ConfigError(f"{name}={raw!r}: expected auto, cpu, cuda or cuda:N (e.g. {name}=cuda:0)")


def task_mix(name: str, raw: str) -> tuple[tuple[str, float], ...]:
    """`chain_sum:1,basic_arithmetic:2` -> (("chain_sum", 1.0), ("basic_arithmetic", 2.0))."""
    mix: list[tuple[str, float]] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        task, _, weight = part.partition(":")
        task = task.strip()
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            value = -1.0
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", task) or not value > 0:
            raise ConfigError(f"{name}={raw!r}: expected task:weight pairs with positive weights "
                              f"(e.g. {name}=chain_sum:1,basic_arithmetic:1)")
        if any(t == task for t, _ in mix):
            raise ConfigError(f"{name}={raw!r}: task {task!r} is listed twice")
        mix.append((task, value))
    if not mix:
        raise ConfigError(f"{name}={raw!r}: expected at least one task (e.g. {name}=chain_sum:1)")
    return tuple(mix)


def seeds(name: str, raw: str) -> tuple[int, ...]:
    """`1,2,3` -> (1, 2, 3): distinct non-negative integers, at most 32."""
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if not parts or len(parts) > 32 or not all(part.isdigit() for part in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"{name}={raw!r}: expected 1 to 32 distinct integers >= 0, comma-separated "
                          f"(e.g. {name}=1,2,3)")
    return tuple(int(part) for part in parts)


def spelled(value: object) -> str:
    """A setting's value, as read or as config.json records it, the way its variable spells it: TASKS's pairs as
    chain_sum:1,basic_arithmetic:2, SEEDS as 1,2,3, None as unset."""
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return ",".join(f"{item[0]}:{item[1]:g}" if isinstance(item, (list, tuple)) and len(item) == 2
                        and isinstance(item[1], (int, float)) else str(item) for item in value)
    return str(value)
