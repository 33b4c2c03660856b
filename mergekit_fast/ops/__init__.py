"""Ops: one module per op, each with its public function, its torch reference (<op>_ref),
backend dispatch and verify= cross-checking."""
