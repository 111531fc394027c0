import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The tests' temporary files (checkpoints of tiny runs, removed as each test passes, see pytest.ini) peak at about
# 2.5 GB. On a fuller disk the suite fails in scattered places and pytest's own output is cut off, so it does not start.
NEEDED_GB = 3


def check_room(where):
    free = shutil.disk_usage(where).free / 2 ** 30
    if free < NEEDED_GB:
        pytest.exit(f"only {free:.1f} GB free for the tests' temporary files in {where}; they need about "
                    f"{NEEDED_GB} GB: free some space, or set TMPDIR (or --basetemp) to a larger disk", returncode=2)


@pytest.fixture(scope="session", autouse=True)
def room_for_temporary_files(tmp_path_factory):
    # pytest's own base folder, made (and the earlier runs' folders beyond the retention count removed) first
    check_room(tmp_path_factory.getbasetemp())
