"""Print the package's requirements from pyproject.toml, one a line, for a cached `pip install -r`.

The images install the dependencies in a layer of their own (it changes only with pyproject.toml),
then the package itself with --no-deps. Usage:

    python requirements.py pyproject.toml [--extra model] [--exclude torch]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str], exclude: set[str]) -> list[str]:
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s): {', '.join(unknown)} (pyproject has: {', '.join(optional)})")
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += optional[extra]
    return [r for r in reqs if _name(r) not in exclude]


def _name(req: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return match.group(1).lower().replace("_", "-") if match else req


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pyproject")
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group to add")
    parser.add_argument("--exclude", action="append", default=[], help="a requirement name to leave out")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    exclude = {_name(e) for e in args.exclude}
    print("\n".join(requirements(data, args.extra, exclude)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
