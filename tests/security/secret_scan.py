"""A precise scan for committed secrets: private keys, tokens, password hashes, credentials.

Precise rather than clever: each rule matches the shape of one kind of secret, so that a hit
is worth a look and the scan needs no baseline of false alarms. Placeholders (`CHANGE_ME`,
`${VAR}`, `<secret>`, RabbitMQ's local `guest`) are not secrets. A true exception (a test
fixture that must hold a real-looking secret) goes in `secrets-allowlist.txt` beside this
file, as `path<TAB>rule<TAB>why`.

Run it by hand with `python -m tests.security.secret_scan [root]`.
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ALLOWLIST = Path(__file__).with_name("secrets-allowlist.txt")
ALWAYS_SKIPPED = {".git", ".venv", ".tools", "node_modules", "__pycache__"}
MAX_BYTES = 2_000_000
CONFIG_SUFFIXES = {".env", ".yml", ".yaml", ".toml", ".ini", ".cfg", ".conf", ".properties"}

RULES: dict[str, re.Pattern[str]] = {
    "private key": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    "private JWK": re.compile(r'"(?:d|p|q|dp|dq|qi)"\s*:\s*"[A-Za-z0-9_-]{40,}"'),
    "JSON web token": re.compile(
        r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"
    ),
    "password hash": re.compile(
        r"\$argon2(?:id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]{16,}\$[A-Za-z0-9+/]{16,}"
        r"|\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}"
    ),
    "AWS access key": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}|\bgithub_pat_[A-Za-z0-9_]{40,}"),
    "Slack token": re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
    "Stripe live key": re.compile(r"\b[rs]k_live_[A-Za-z0-9]{16,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "password in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:(?P<value>[^@\s/'\"]+)@"),
}
# Only in configuration files: in code, `password = "..."` is mostly a test's input.
CONFIG_RULES: dict[str, re.Pattern[str]] = {
    "secret in configuration": re.compile(
        r"(?i)\b[A-Z0-9_.-]*(?:PASSWORD|PASSWD|SECRET|API_?KEY|TOKEN)[A-Z0-9_.-]*\s*[:=]\s*"
        r"['\"]?(?P<value>[^\s'\"#,}]{8,})"
    ),
}
PLACEHOLDER = re.compile(
    r"^(?:\$|<|\{|%|\*)|change_?me|example|placeholder|dummy|redacted|^x{6,}$"
    r"|^(?:guest|pass|passwd|password|secret|token)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}"


def ignored_patterns(root: Path) -> list[str]:
    gitignore = root / ".gitignore"
    if not gitignore.exists():
        return []
    lines = (line.strip() for line in gitignore.read_text().splitlines())
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


def _ignored(relative: str, name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _ignores_itself(directory: Path) -> bool:
    """A cache that keeps itself out of git (its own .gitignore says `*`)."""
    own = directory / ".gitignore"
    return own.is_file() and "*" in own.read_text().split()


def files_to_scan(root: Path) -> Iterator[Path]:
    """Every file that could be committed: the tree without what .gitignore excludes."""
    patterns = ignored_patterns(root)
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in ALWAYS_SKIPPED
            and not _ignored((here / d).relative_to(root).as_posix(), d, patterns)
            and not _ignores_itself(here / d)
        )
        for name in sorted(filenames):
            path = here / name
            if not _ignored(path.relative_to(root).as_posix(), name, patterns):
                yield path


def _text(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data[:8192]:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def scan_text(text: str, *, config: bool) -> Iterator[tuple[int, str]]:
    rules = {**RULES, **(CONFIG_RULES if config else {})}
    for number, line in enumerate(text.splitlines(), start=1):
        for rule, pattern in rules.items():
            for match in pattern.finditer(line):
                value = match.groupdict().get("value")
                if value is not None and PLACEHOLDER.search(value):
                    continue
                yield number, rule
                break


def load_allowlist(path: Path = ALLOWLIST) -> set[tuple[str, str]]:
    allowed = set()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                file, rule, _why = [*line.split("\t"), "", ""][:3]
                allowed.add((file.strip(), rule.strip()))
    return allowed


def scan(root: Path, allowlist: set[tuple[str, str]] | None = None) -> list[Finding]:
    allowed = load_allowlist() if allowlist is None else allowlist
    findings = []
    for path in files_to_scan(root):
        text = _text(path)
        if text is None:
            continue
        relative = path.relative_to(root).as_posix()
        config = path.suffix in CONFIG_SUFFIXES or path.name.startswith(".env")
        for line, rule in scan_text(text, config=config):
            if (relative, rule) not in allowed:
                findings.append(Finding(relative, line, rule))
    return findings


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    findings = scan(root)
    for finding in findings:
        print(finding)
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
