import os
import sys

# Test-support modules (tiny_models) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))
