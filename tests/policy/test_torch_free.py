"""The policy core and the simulator must import with torch unimportable."""

import subprocess
import sys

CODE = """
import sys
sys.modules["torch"] = None
import pkgutil, importlib, hybrimoe.policy
for module in pkgutil.iter_modules(hybrimoe.policy.__path__):
    importlib.import_module(f"hybrimoe.policy.{module.name}")
import hybrimoe.trace
import hybrimoe.config
assert sys.modules["torch"] is None
print("ok")
"""


def test_policy_core_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
