"""Routing traces: which experts every token chose in every MoE layer, step by step.

Modules: `format` (the trace records and their validation, the .npz file format, metadata from a
model's shape), `importers` (foreign routing logs: vllm-jsonl, and sglang-dump through `sglang`)
and `summary` (what `hybrimoe trace info` reports). The names below are the package's public API:
`from hybrimoe.trace import RoutingTrace`. No module here imports torch when imported (the policy
core and the simulator read traces); `sglang` loads it to read a dump, when asked to.
"""

from hybrimoe.trace.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    RoutingTrace,
    TraceMeta,
    TraceStep,
    load_trace,
    load_trace_meta,
    save_trace,
    trace_meta_from_hf_config,
    trace_meta_from_shape,
)
from hybrimoe.trace.importers import (
    IMPORT_FORMATS,
    import_trace_files,
    import_vllm_jsonl,
    read_sglang_dumps,
    read_vllm_jsonl,
)
from hybrimoe.trace.summary import TraceSummary, trace_summary

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMPORT_FORMATS",
    "RoutingTrace",
    "TraceMeta",
    "TraceStep",
    "TraceSummary",
    "import_trace_files",
    "import_vllm_jsonl",
    "load_trace",
    "load_trace_meta",
    "read_sglang_dumps",
    "read_vllm_jsonl",
    "save_trace",
    "trace_meta_from_hf_config",
    "trace_meta_from_shape",
    "trace_summary",
]
