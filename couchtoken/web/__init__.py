"""The public HTTP side: the Klein route, streaming, conditional requests, headers, the access log."""
