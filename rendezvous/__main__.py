"""`python -m rendezvous ...` is `peerpost-rendezvous ...`."""

import sys

from rendezvous.cli import main

sys.exit(main())
