"""couchtoken: token-guarded download links for CouchDB attachments."""

__version__ = "0.1.0"
