"""Packaging glue that pyproject.toml cannot express: ship the top-level ``recipes/`` folder
inside the installed package as ``loratools.recipes`` (named resize and training recipes work
after a plain ``pip install``, not only in a checkout)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["loratools*", "trainer*"]), "loratools.recipes", "loratools.recipes.resize",
              "loratools.recipes.lbw"],
    package_dir={"loratools.recipes": "recipes"},
    package_data={
        "loratools": ["py.typed"],
        "loratools.recipes": ["*.toml", "resize/*.toml", "lbw/*.toml"],
        "trainer": ["configs/*/*.json"],
    },
)
