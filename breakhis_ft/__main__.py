"""`python -m breakhis_ft`: the same entrypoint as the `breakhis-ft` console script."""

from breakhis_ft.run.cli import main

main()
