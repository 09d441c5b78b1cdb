"""Package list for the build: the repository's root folders ``passes/`` and
``templates/`` (and their subpackages) install as ``attn_compiler.passes`` and
``attn_compiler.templates``; the folder mapping itself is in pyproject.toml."""
from setuptools import find_packages, setup

MAPPED = {"passes": "attn_compiler.passes", "templates": "attn_compiler.templates"}

packages = find_packages(include=["attn_compiler", "attn_compiler.*"])
for folder, name in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages)
