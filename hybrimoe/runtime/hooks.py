"""Plugging the executor into a transformers model through its own extension points.

Design choices:
- Experts: transformers dispatches every `@use_experts_implementation` experts module through
  `ExpertsInterface` by `config._experts_implementation`; we register one more implementation,
  "hybrimoe", and select it with `set_experts_implementation`. The model's code runs unchanged:
  its router picks the experts and weights, its MoE block adds shared experts; only the routed
  experts' computation is ours.
- Router probabilities: a forward hook on each router keeps its logits for the executor (the
  router runs just before the experts of the same layer).
- Each experts module carries its MoE layer number and the executor as one attribute, set on
  install and removed on `remove()`, which also restores the previous implementation.
- The dense part's CPU-resident linear layers run the native decode kernel while installed
  (`native.NativeLinears`; on CUDA they are on the GPU and keep torch's).
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface

from hybrimoe.errors import ModelError
from hybrimoe.runtime import native
from hybrimoe.runtime.executor import LayerExecutor
from hybrimoe.runtime.loading import LoadedModel

IMPLEMENTATION = "hybrimoe"
_BINDING = "_hybrimoe_binding"


def _hybrid_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,  # [T, D]
    top_k_index: torch.Tensor,  # [T, k]
    top_k_weights: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    executor, layer = getattr(self, _BINDING)
    return executor.run(layer, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, _hybrid_experts_forward)


class Installed:
    """The hooks of one executor on one model; `remove()` restores the model."""

    def __init__(self, loaded: LoadedModel, executor: LayerExecutor):
        self.loaded = loaded
        model = loaded.model
        for layer in loaded.layers:
            _check_router(loaded, layer.router)
        self._previous = model.config._experts_implementation
        self._handles = []
        for layer in loaded.layers:
            setattr(layer.experts, _BINDING, (executor, layer.index))
            self._handles.append(layer.router.register_forward_hook(_capture(executor, layer.index)))
        model.set_experts_implementation(IMPLEMENTATION)
        self._linears = native.NativeLinears(model)
        unhooked = [layer for layer in loaded.layers if layer.experts.config._experts_implementation != IMPLEMENTATION]
        if unhooked:
            self.remove()
            raise ModelError(f"{loaded.family}: the model does not let its experts implementation be replaced")

    def remove(self) -> None:
        self._linears.remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.loaded.layers:
            if hasattr(layer.experts, _BINDING):
                delattr(layer.experts, _BINDING)
        self.loaded.model.set_experts_implementation(self._previous)


def _check_router(loaded: LoadedModel, router: torch.nn.Module) -> None:
    """The executor relies on routers returning (logits [T, E], weights [T, k], indices [T, k])."""
    weight = router.weight
    with torch.inference_mode():
        out = type(router).forward(router, torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device))
    shapes = [tuple(t.shape) for t in out] if isinstance(out, tuple) else None
    if shapes != [(1, loaded.n_experts), (1, loaded.top_k), (1, loaded.top_k)]:
        raise ModelError(f"{loaded.family}: its router does not return (logits, weights, indices); not supported")


def _capture(executor: LayerExecutor, layer: int):
    def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
        executor.router_logits[layer] = output[0]  # [T, E]

    return hook
