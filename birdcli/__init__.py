"""birdcli: a command line for training and shipping bird-species image classifiers."""

__version__ = "0.1.0"
