"""``python -m speechtrim``: the same as the ``speechtrim`` console script."""

import sys

from speechtrim.cli import main

if __name__ == "__main__":
    sys.exit(main())
