"""`python -m services ...` is the `tandem` command."""

from services.cli import main

main()
