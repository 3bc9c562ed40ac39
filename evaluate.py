"""Not implemented yet: this stage lands with its own issue (see README, 'Status')."""

import sys

if __name__ == "__main__":
    sys.exit("error: evaluate.py is not implemented yet; see README, 'Status'")
