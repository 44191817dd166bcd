"""`python -m gateway`: run the local gateway (as `esctl gateway run` does)."""

from gateway.runner import main

main()
