"""`python -m birdcli` (and `torchrun -m birdcli train ...`)."""

from birdcli.cli import main

if __name__ == "__main__":
    main()
