"""The transfer protocol: handshake, encrypted control frames, raw sealed chunks.

`frames` (wire messages) → `core` (sans-I/O connection) → `requester` (the fetching side's
adapter) and `holder` + `server` (the serving side); `scheduler`, `pacing` and `downloader`
fetch one content from several holders at once.
"""
