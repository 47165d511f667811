"""pytest configuration shared by the whole suite.

Puts this folder on ``sys.path`` so that tests can ``import parity`` (the shared parity
machinery), and registers the ``slow`` marker (deselect with ``-m "not slow"``).
"""

import os
import sys

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
