"""Talking to CouchDB: the HTTP client, the _changes feeds, and the caches they keep fresh."""
