"""Charts drawn with Pillow only (no matplotlib): generic panels (:mod:`.charts`) and the σ plots of
``tools/plot_timesteps.py`` (:mod:`.timesteps`)."""
