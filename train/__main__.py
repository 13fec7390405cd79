"""python -m deltajax.train == deltajax-train."""
import sys

from deltajax.train.cli import main

sys.exit(main())
