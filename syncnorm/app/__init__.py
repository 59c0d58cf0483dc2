"""syncnorm's training application: a Hydra + Lightning app around the library.

* :mod:`syncnorm.app.train`: ``train(cfg)`` and the ``syncnorm-train`` / ``python -m syncnorm.train``
  command; configs in the repository's top-level ``conf/``, installed as ``syncnorm/app/conf/``
  (:func:`syncnorm.app.config.config_dir`);
* :mod:`syncnorm.app.config`: config checks (values, with the library's rules), ``imports``;
* :mod:`syncnorm.app.resolvers`: the ``${syncnorm.*}`` resolvers the configs use;
* :mod:`syncnorm.app.runtime`: building callbacks and loggers from config nodes, weights, the report,
  short messages for input errors, multirun jobs under Lightning's DDP launch;
* :mod:`syncnorm.app.loggers`: a resumed run keeps its history (CSV rows, the W&B run id);
* :mod:`syncnorm.app.models`, :mod:`syncnorm.app.data`: networks, LightningModules, data modules;
* :mod:`syncnorm.app.demo`: a plain-PyTorch SyncBatchNorm demo (no Hydra, no Lightning).

Importing the app needs the ``hydra`` and ``lightning`` extras (``data`` for the datasets); the
library (``import syncnorm``) needs none of them.
"""
