import sys

from vistok import hide_checkout

if __name__ == "__main__":
    hide_checkout()
    from vistok.eval.bench.cli import main

    sys.exit(main())
