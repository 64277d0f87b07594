"""The web inbox: the node's own pages on loopback (overlay.app.web.server)."""
