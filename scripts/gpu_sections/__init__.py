"""The sections of scripts/gpu_check.py and what they share: the report (`report`), the models,
inputs and timing helpers (`context`), the output comparisons (`compare`), and one module per
section (`env`, `parity`, `autocast`, `sync`, `sdpa`, `deform`, `bench`), each holding its
`section_*` function and its own helpers. Imported by scripts/gpu_check.py, which runs them; the
modules import their neighbours and `benchmark_peers` as top-level modules (scripts/ is
sys.path[0] when the script runs), and the checkout root is on sys.path for `grounding` and
`segmentation` (gpu_check.py and benchmark_peers put it there).
"""
