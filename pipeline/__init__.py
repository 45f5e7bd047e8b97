"""The straight flow from a trained checkpoint to a verified artifact, and the command line.

:func:`pipeline.run.run` runs a :class:`pipeline.recipe.Recipe` end to end; :mod:`pipeline.cli`
is the ``compress-and-export`` command.  ``compressor`` and ``exporters`` never import from here.
"""
