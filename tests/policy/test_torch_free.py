"""The policy core and the simulator must import with torch unimportable."""

import subprocess
import sys

CODE = """
import sys
sys.modules["torch"] = None
import hybrimoe.policy.strategies, hybrimoe.policy.simulator, hybrimoe.policy.prefetch
import hybrimoe.policy.cache, hybrimoe.policy.scheduler, hybrimoe.policy.costs, hybrimoe.trace
import hybrimoe.config
assert sys.modules["torch"] is None
print("ok")
"""


def test_policy_core_imports_without_torch():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
