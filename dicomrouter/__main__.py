"""`python -m dicomrouter` is the `dicomrouter` command."""

from dicomrouter.cli import main

main()
