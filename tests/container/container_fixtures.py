"""Session fixtures of the container checks: podman with this suite's settings, the Debian base
images (made from the apt mirror once per machine), the agenthost image built from the
repository's Dockerfile, and the MongoDB test server image."""
import subprocess

import pytest

from container_helpers import (AGENT_IMAGE, HERE, MONGO_IMAGE, REPO, Podman, containers_conf,
                               run_id, wait_for)


@pytest.fixture(scope="session")
def podman(tmp_path_factory):
    conf = containers_conf(tmp_path_factory.mktemp("podman") / "containers.conf")
    pm = Podman(conf, run_id())
    # Fails loudly (not a skip) when podman cannot run a container here.
    pm("version")
    pm.cleanup(stale=True)
    yield pm
    pm.cleanup()


@pytest.fixture(scope="session")
def base_images(podman):
    """localhost/debian:bookworm and :bookworm-slim, made unless present (about 30 s)."""
    p = subprocess.run([str(HERE / "make-base-images.sh")], env=podman.env, capture_output=True,
                       text=True, timeout=900)
    if p.returncode != 0:
        pytest.fail(f"make-base-images.sh exited {p.returncode}:\n{p.stderr[-4000:]}")
    return ("localhost/debian:bookworm", "localhost/debian:bookworm-slim")


def build(podman, tag, *args, context=REPO, timeout=900):
    """podman build in docker format (keeps HEALTHCHECK), cached layers, never pulling: the
    FROM images are the local ones. Returns the image id. The image the tag named before is
    removed with its cached layers, so rebuilding after each change does not fill the disk."""
    before = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False).stdout.strip()
    p = podman("build", "--format", "docker", "--pull=never", "--layers", "-q", "-t", tag, *args,
               str(context), timeout=timeout)
    image_id = p.stdout.strip().splitlines()[-1]
    if before and not image_id.startswith(before) and not before.startswith(image_id):
        podman("rmi", before, check=False)
    return image_id


@pytest.fixture(scope="session")
def agent_image(podman, base_images):
    """The image built from the repository's Dockerfile (its id)."""
    return build(podman, AGENT_IMAGE)


@pytest.fixture(scope="session")
def build_stage_image(podman, agent_image):
    """The Dockerfile's build stage (from the layer cache of the build above)."""
    return build(podman, AGENT_IMAGE + "-build-stage", "--target", "build")


@pytest.fixture(scope="session")
def mongo_image(podman, base_images):
    return build(podman, MONGO_IMAGE, "-f", str(HERE / "mongo.Containerfile"), context=HERE)


@pytest.fixture(scope="session")
def start_mongo(podman, mongo_image):
    """start_mongo(what, network, hostname) -> (container name, IP): the test server as a
    one-member replica set rs0 named `hostname` on the podman network, answering on 27017."""
    def start(what, network, hostname):
        name = podman.run_detached(
            what, mongo_image,
            "--hostname", hostname, "--read-only",
            "-v", f"{REPO / 'tests' / 'mongo'}:/srv/mongo:ro",
            cmd=("--host", hostname, "--port", "27017", "--mode", "replset"),
            network=network)
        wait_for(f"{name} ready", lambda: "ready 27017" in podman.logs(name), timeout=30)
        return name, podman.ip(name, network)
    return start
