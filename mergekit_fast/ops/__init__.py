"""Ops: one module per op, each with its public function, its torch reference (<op>_ref),
backend dispatch and verify= cross-checking."""

# SLERP: tensors up to this many elements go through the segmented (one-launch, single-pass) GPU
# kernels, and the engine merges them in batches.
SLERP_SEGMENT_MAX_NUMEL = 1 << 15
# mergekit's SLERP constants: norms at or below SLERP_EPS count as 1; above SLERP_DOT_THRESHOLD (in
# |cos|) the coefficients are linear.
SLERP_EPS = 1e-8
SLERP_DOT_THRESHOLD = 0.9995
