"""pytest picks up the session fixtures from deploy_helpers (a uniquely named module: several
test directories have a conftest.py, so tests must not import helpers `from conftest`)."""
from deploy_helpers import (accepted_env_vars, http_literals, k8s_objects,  # noqa: F401
                            node_validator, route_ok)
