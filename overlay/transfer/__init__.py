"""The transfer protocol: handshake, encrypted control frames, raw sealed chunks.

`frames` (wire messages) → `core` (sans-I/O connection) → `session` (client adapter) and
`server` (serving adapter). See DESIGN.md, "Getting the bytes".
"""
