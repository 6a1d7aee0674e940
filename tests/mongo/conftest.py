import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Fixtures `mongo_server` (replica set "rs0") and `mongo_standalone`; other test
# directories can import them the same way.
from mongo_fixture import mongo_server, mongo_standalone  # noqa: E402,F401
