"""`make audit`: pip-audit on every package of uv.lock, failing loudly when it cannot check.

pip-audit reports "No known vulnerabilities found" and exits 0 even when it could not look a
single package up (each one is only "skipped"). A check that cannot see must not pass: any
skipped package, or an unreachable vulnerability service, fails here with the reason.

Usage: python -m tests.security.audit_dependencies [--service pypi|osv]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "bin" / "uv"
PIP_AUDIT = Path(sys.executable).with_name("pip-audit")
CANNOT_CHECK = 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", choices=["pypi", "osv"], default="pypi")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        report = Path(tmp) / "audit.json"
        subprocess.run(
            [
                *(str(UV), "export", "--frozen", "--format", "requirements-txt", "--all-groups"),
                *("--no-emit-project", "--no-hashes", "--quiet", "-o", str(requirements)),
            ],
            cwd=ROOT,
            check=True,
        )
        audit = subprocess.run(
            [
                *(str(PIP_AUDIT), "-r", str(requirements), "--no-deps", "--disable-pip"),
                *("--progress-spinner", "off", "--timeout", "15", "-s", args.service),
                *("-f", "json", "-o", str(report)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if not report.exists():
            last = (audit.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"pip-audit could not reach its vulnerability service ({args.service}): {last}")
            return CANNOT_CHECK
        result = json.loads(report.read_text())
    packages = result.get("dependencies", [])
    skipped = [p for p in packages if p.get("skip_reason")]
    vulnerable = [p for p in packages if p.get("vulns")]
    for package in vulnerable:
        for vuln in package["vulns"]:
            fixed = ", ".join(vuln.get("fix_versions", [])) or "no fix yet"
            print(f"{package['name']} {package['version']}: {vuln['id']} (fixed in {fixed})")
    if skipped:
        print(
            f"pip-audit could not check {len(skipped)} of {len(packages)} packages against "
            f"{args.service}; e.g. {skipped[0]['skip_reason']}\n"
            "The audit needs PyPI's per-version JSON API (service pypi) or the OSV API "
            "(service osv) to answer from this machine."
        )
        return CANNOT_CHECK
    if vulnerable:
        return 1
    print(f"pip-audit: {len(packages)} locked packages, no known vulnerability")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
