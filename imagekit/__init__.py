"""imagekit: build, customise, convert, check and publish VM disk images for OpenStack."""

__version__ = "0.1.0"
