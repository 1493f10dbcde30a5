"""A bdlab plugin: one attack and one defense outside bdlab's tree, with their options under ``conf/``.

Run them with ``BDLAB_PLUGINS=bdlab_example_plugin python -m bdlab.run attack=plus_patch defense=median_filter``.
"""
