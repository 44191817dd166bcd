"""Where the package's source is: one folder up in the repository, beside this folder in an
sdist (which carries a copy). hatchling's static `force-include` cannot say "either"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class SharedContractsSource(BuildHookInterface):  # type: ignore[misc]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        root = Path(self.root)
        for source in (root.parent / "shared_contracts", root / "shared_contracts"):
            if (source / "__init__.py").is_file():
                break
        else:
            msg = f"shared_contracts not found beside or above {root}"
            raise FileNotFoundError(msg)
        build_data["force_include"][str(source)] = "shared_contracts"
        marker = root / "py.typed"  # the typed-package marker (inside the copy in an sdist)
        if marker.is_file():
            build_data["force_include"][str(marker)] = "shared_contracts/py.typed"
