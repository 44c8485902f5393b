"""Vicinity attention: its custom ops (``ops``, ``varlen``), the quadratic oracle (``reference``), the
linear pure-PyTorch backend (``torch_backend`` with ``axis_terms``, ``scratch``, ``cpu_threads``), the
fused backend over ``vicinity_attn.kernels.vicinity`` (``triton_backend``, ``triton_varlen``), forward-mode
AD (``tangent``) and context parallelism (``context_parallel`` over ``torch_shards`` / ``triton_shards``).

Data flows one way: public function -> validation -> custom op -> backend -> kernels."""
