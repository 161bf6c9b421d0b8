"""Hardware profiles: what one machine's CPU, GPU and PCIe cost for one model's experts.

Modules: `estimate` (datasheet roofline estimates, written as profiles marked `estimated: true`),
`machine`, `timing`, `standins`, `measure` and `fit` (measuring a machine: `hybrimoe profile`).
Model shapes (built-in presets and transformers config.json parsing) are in `hybrimoe.shapes`.
"""
