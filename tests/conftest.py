"""Every test, and every process a test starts, sees no /etc/mta/mta.toml.

mta finds its configuration through -c, $MTA_CONFIG, then /etc/mta/mta.toml when that
exists (mta/config.py find()): a machine with a real one would otherwise change what a
test without -c runs on. MTA_TEST_SYSTEM_CONFIG moves that path, for tests only; this
points it at a file that never exists (a test of discovery points it at its own).
"""

import os

from mta.config import SYSTEM_PATH_ENV

os.environ[SYSTEM_PATH_ENV] = "/nonexistent/mta-tests/mta.toml"
