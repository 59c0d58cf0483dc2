"""``python -m syncnorm.train [overrides]``: the training app's command, at its documented name.

The app lives in :mod:`syncnorm.app.train`; this module only runs its :func:`~syncnorm.app.train.main`
(the console script ``syncnorm-train`` calls the same function).
"""

from .app.train import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
