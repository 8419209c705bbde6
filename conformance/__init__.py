"""conformance: the same model, weights and data through both backends, per policy.

``dualprec conformance`` runs the default matrix (cli.py); ``compare`` runs the checks on a
user's own torch/Flax pair; ``golden`` records numerics once and checks later runs; the
``golden`` pytest fixture lives in ``conformance.pytest_plugin``; ``calibrate`` runs compare()
over seeds and reports how close a pair comes to each bound on this machine; ``torch_to_flax`` /
``flax_to_torch`` / ``WeightMap`` move weights between the frameworks (conformance.weights).
"""

from .calibrate import calibrate
from .compare import Comparison, compare
from .records import Record
from .weights import WeightMap, flax_to_torch, torch_to_flax

__all__ = ["calibrate", "compare", "Comparison", "Record", "WeightMap", "flax_to_torch", "run", "torch_to_flax"]


def run(policies=None, models=None, steps: int = 3, backends=None):
    """The default matrix (or the given policies/models) as a list of Records."""
    from . import matrix
    from .zoo import MODELS

    return matrix.run(policies, models or MODELS, steps=steps, backends=backends)
