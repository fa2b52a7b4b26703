"""CPU seconds per image of stain normalisation: breakhis_ft/data/stain_cost.py."""

import sys

from breakhis_ft.data.stain_cost import main

if __name__ == "__main__":
    sys.exit(main())
