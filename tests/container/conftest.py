"""pytest picks up the session fixtures from container_fixtures (a uniquely named module: several
test directories have a conftest.py, so tests must not import helpers `from conftest`)."""
from container_fixtures import (agent_image, base_images, build_stage_image, mongo_image,  # noqa: F401
                                podman, start_mongo)
