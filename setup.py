"""Packaging beyond what pyproject.toml can say: the shipped recipes and elements.

The checkout keeps them at the top level (``recipes/``, ``elements/``), where they are
edited; a wheel or an sdist install needs them inside the package. setuptools' own
``package_dir`` mapping does it: ``recipes/`` becomes ``imagekit/shipped/recipes`` and
``elements/`` becomes ``imagekit/shipped/elements`` (files copied with their modes, so the
elements' scripts stay executable). The sdist carries the top-level folders as they are.
Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

SHIPPED = {"imagekit.shipped.recipes": "recipes", "imagekit.shipped.elements": "elements"}

setup(
    packages=find_packages(include=["imagekit", "imagekit.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={"imagekit.shipped.recipes": ["*.yaml", "*.yml"], "imagekit.shipped.elements": ["**/*"]},
)
