"""hybrimoe: run Mixture-of-Experts models fast on a GPU too small to hold all the experts.

The policy core (`hybrimoe.policy`) decides, for every MoE layer of every step, which experts run
on the CPU, which run on the accelerator from its expert cache, which are loaded first and what to
prefetch; the simulator and the runtime call the same policy objects.
"""

__version__ = "0.1.0"

import os as _os

# Models come from local paths only: the Hugging Face hub is never consulted, whatever a checkpoint
# names (set before transformers or huggingface_hub are imported; a user's explicit setting wins).
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
