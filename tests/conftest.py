"""Shared test setup: small CPU thread count so tests behave the same on 2-core CI machines."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
