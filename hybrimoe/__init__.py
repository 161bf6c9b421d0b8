"""hybrimoe: run Mixture-of-Experts models fast on a GPU too small to hold all the experts.

The policy core (`hybrimoe.policy`) decides, for every MoE layer of every step, which experts run
on the CPU, which run on the accelerator from its expert cache, which are loaded first and what to
prefetch; the simulator and the runtime call the same policy objects.
"""

__version__ = "0.1.0"
