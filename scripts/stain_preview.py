"""Originals beside their stain-normalised versions: breakhis_ft/data/stain_preview.py."""

import sys

from breakhis_ft.data.stain_preview import main

if __name__ == "__main__":
    sys.exit(main())
