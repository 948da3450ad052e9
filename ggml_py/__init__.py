"""ggml_py: a small ggml-style graph library.

``graph`` (tensors and static graphs), ``ops`` (pure op constructors), ``backend``
(the interface) and one module per backend (``backend_numpy`` is the reference).
"""
from . import ops
from .backend import Backend, Plan, WeightSource, get_backend
from .graph import Graph, Tensor

__all__ = ["Backend", "Graph", "Plan", "Tensor", "WeightSource", "get_backend", "ops"]
