"""One owner per fact: a file the framework writes for a user is published by checkpointing.py alone (written
beside its name, synced, renamed, the directory synced), so none is ever seen half-written."""

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "xception_pl"
RENAMES = re.compile(r"os\.(replace|rename)\(|\.rename\(|\b(tmp|partial)\w*\.replace\(")


def test_only_checkpointing_py_renames_files_into_place():
    found = {str(path.relative_to(PACKAGE)): [line.strip() for line in path.read_text().splitlines()
                                              if RENAMES.search(line)]
             for path in PACKAGE.rglob("*.py") if path.name != "checkpointing.py"}
    found = {name: lines for name, lines in found.items() if lines}
    # the demo data's build directory, renamed into the cache whole (a directory: atomic_path writes files)
    assert found == {"data/demo.py": ['(Path(tmp) / "build").rename(final)']}
