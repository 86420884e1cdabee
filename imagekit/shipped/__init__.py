"""The recipes and diskimage-builder elements imagekit ships, as package data.

In a wheel or an sdist install this package holds ``recipes/`` (the shipped recipes) and
``elements/`` (imagekit's diskimage-builder elements). They are not kept here in the
source tree: the checkout's top-level ``recipes/`` and ``elements/`` are the source, and
``setup.py`` maps them into this package when a wheel is built. A checkout (an editable
install, or ``PYTHONPATH``) uses the top-level folders directly: see
:func:`imagekit.paths.shipped_dir`.
"""
