"""Which packages the wheel holds (the metadata is in pyproject.toml): ``syncnorm`` and its
subpackages, plus the app's Hydra configs, kept once in the top-level ``conf/`` and installed as
``syncnorm/app/conf/`` (:func:`syncnorm.app.config.config_dir` finds either)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["syncnorm", "syncnorm.*"]), "syncnorm.app.conf"],
      package_dir={"syncnorm.app.conf": "conf"})
