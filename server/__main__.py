"""`python -m server` runs `mhr serve`."""

from server.main import main

main()
