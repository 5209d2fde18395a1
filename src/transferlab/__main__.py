import sys

from transferlab.cli import entry

sys.exit(entry())
