import importlib
import sys

sys.modules[__name__] = importlib.import_module("remoterl.client.connection")  # TEMPORARY-SHIM
