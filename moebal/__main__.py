"""``python -m moebal`` runs the ``moebal`` command."""
import sys

from moebal.cli import main

if __name__ == "__main__":
    sys.exit(main())
