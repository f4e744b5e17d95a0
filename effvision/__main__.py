import sys

from effvision.cli import main

sys.exit(main())
