"""Check the layering contracts of setup.cfg with import-linter, on the tree as it installs.

`make test` runs this. import-linter (grimp) reads a package from one folder, while our
``crossroads.layer``, ``crossroads.consumers`` and ``crossroads.bridges`` live in top-level folders
that setup.cfg's ``package_dir`` maps into the namespace. So the package is first laid out as a
wheel would hold it (setuptools' own ``build_py``, which reads that mapping: nothing here repeats
it) in a temporary folder, and import-linter checks that.

    python tests/lint_imports.py [REPOSITORY]     exit status and output: import-linter's own
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def lint_imports(repository: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="crossroads-lint-imports-") as stage:
        built = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                                "--build-lib", stage], cwd=repository, capture_output=True, text=True)
        if built.returncode != 0:
            print(f"laying out the package for import-linter failed:\n{built.stdout}{built.stderr}", file=sys.stderr)
            return built.returncode
        lint = Path(sys.executable).with_name("lint-imports")
        env = {**os.environ, "PYTHONPATH": stage}
        return subprocess.run([str(lint), "--no-cache", "--no-logo", str(repository / "setup.cfg")], cwd=stage,
                              env=env).returncode


if __name__ == "__main__":
    sys.exit(lint_imports(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)))
