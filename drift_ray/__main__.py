import sys

from drift_ray.cli import main

sys.exit(main())
