"""zckpt's benchmarks, one package: ``harness`` (what every script shares), ``methods``
(the registry of save methods), ``report`` (tables, JSON, Markdown, PNG), and the scripts
``throughput``, ``fanout``, ``gil`` and ``overhead``.

One import convention: every module imports its siblings as the package
(``from bench import harness``). Run a script from the repository root as a file
(``python bench/throughput.py``), as a module (``python -m bench.throughput``) or, for
throughput, as ``zckpt bench``; a script run as a file puts the repository root first on
``sys.path`` (its first lines, the only place that does), which also makes the working
tree's ``zckpt`` the one imported.
"""
