"""``python -m ldmfast``: see ``ldmfast.cli``."""
import sys

from ldmfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
