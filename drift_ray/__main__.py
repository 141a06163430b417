from drift_ray.cli import entry

entry()
