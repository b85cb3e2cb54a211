import sys

from payfleet.cli.main import main

sys.exit(main())
