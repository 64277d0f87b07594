"""Text bounds of a location message, in a module that imports nothing.

`peerpost send` checks `--title` and `--note` against them before its first round trip to
the node; taking them from `crypto.location` loaded PyNaCl and cryptography into the CLI,
about 25 ms of every `send` on this machine (0.05 s → 0.08 s for the CLI's imports alone).
"""

MAX_TITLE = 200
MAX_NOTE = 4000
MAX_SEND_TO = 64  # addresses one `send` names (the node's send operation takes no more)
