"""Parsers for environment values; each raises ConfigError with one line: name, value, what is allowed."""

import re
from pathlib import Path
from typing import Callable, Sequence

from configs_env.errors import ConfigError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")     # matched whole: a `$` anchor passes "name\n"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

Parser = Callable[[str, str], object]


def integer(minimum: int, maximum: int | None = None, example: int | None = None) -> Parser:
    shown = example if example is not None else max(minimum, 1)

    def parse(name: str, raw: str) -> int:
        text = raw.strip()
        ok = text.lstrip("-").isdigit() and int(text) >= minimum and (maximum is None or int(text) <= maximum)
        if not ok:
            upper = f" and <= {maximum}" if maximum is not None else ""
            raise ConfigError(f"{name}={raw!r}: expected an integer >= {minimum}{upper} (e.g. {name}={shown})")
        return int(text)
    return parse


def number(minimum: float, example: str, exclusive: bool = False, maximum: float | None = None) -> Parser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        too_big = maximum is not None and value > maximum
        if not (value > minimum if exclusive else value >= minimum) or value != value or value == float("inf") \
                or too_big:
            bound = ">" if exclusive else ">="
            upper = f" and <= {maximum:g}" if maximum is not None else ""
            raise ConfigError(f"{name}={raw!r}: expected a number {bound} {minimum:g}{upper} (e.g. {name}={example})")
        return value
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
