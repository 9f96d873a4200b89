"""distillab's Hydra launcher plugin: ``hydra/launcher=stacked`` (see ``distillab.stacked``)."""
