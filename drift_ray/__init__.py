"""drift-ray: DRIFT (Decoupled Rollouts and Importance-Weighted Fine-Tuning) on Ray.

prompts → rollouts → weights → weighted SFT → evaluation; `drift_ray.pipeline` knows the order.
"""

__version__ = "0.1.0"
