"""Makes conf/ a package, so Hydra finds it as pkg://bdlab_example_plugin.conf."""
