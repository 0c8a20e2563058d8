"""Importable helpers shared by the tests and the benchmarks: the API-server emulator and the controller
stand-ins (cluster.py), runtime servers and polling (runtime.py), helm/kubectl and rendered manifests (chart.py).
Test modules import from here, never from each other."""
