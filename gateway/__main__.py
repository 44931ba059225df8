"""`python -m gateway` is `ecr-gateway`."""

from gateway.cli import main

main()
