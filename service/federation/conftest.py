# The hub and the sites' clients import Flower, which lives in `.venv-fed` only (`make federation`):
# pytest in the service's environment does not import them for their doctests. Their tests,
# tests/service/test_federation.py, run them in `.venv-fed` as processes.
import importlib.util

collect_ignore = [] if importlib.util.find_spec("flwr") else ["hub.py", "site_client.py"]
