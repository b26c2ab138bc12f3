"""Development only: a PouchDB Server and a CouchDB release to run against, and the demo."""
