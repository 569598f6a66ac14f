"""`python -m launcher.bench`: the benchmark suite (`launcher.bench.suite`)."""

import sys

from launcher.bench.suite import main

if __name__ == "__main__":  # importing it (the import checks walk every module) runs nothing
    sys.exit(main())
