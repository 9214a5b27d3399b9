"""A corpus of short real trainings, each a failure a health rule must catch or a healthy run it
must leave alone. ``data`` and ``models`` make the ingredients (offline: scikit-learn's bundled
digits and synthetic sets), ``corpus`` lists the scenarios and trains one through
``tbhealth.Monitor`` in a plain loop. ``benchmarks/bench_health.py`` runs them all and prints the
table; ``tests/test_health_regressions.py`` trains some of them as regression tests."""
