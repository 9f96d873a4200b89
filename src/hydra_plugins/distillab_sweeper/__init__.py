"""distillab's Hydra sweeper plugin: ``hydra/sweeper=optuna``, a study kept in a database (see ``distillab.study``)."""
