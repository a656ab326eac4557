"""deployd: a deploy daemon for Capistrano-style releases over SSH."""

__version__ = "0.1.0"
